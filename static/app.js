// The page: interface language, health badge, character counter, the avatar library (pick, upload
// with progress and a face check, delete), jobs (submit, follow over SSE, stream while rendering,
// cancel), player and download, and this browser's recent videos.
// Everything is wired up here with addEventListener and data-* attributes: the page needs no
// inline script or handler, so a Content-Security-Policy without 'unsafe-inline' works.
(function () {
  "use strict";

  const I18N = window.I18N || {};
  const UI_LANGS = ["ru", "kk", "en"];
  const STAGES = ["tts", "lipsync", "encode"];
  const KEYS = { uiLang: "talking-avatar.ui-lang", speechLang: "talking-avatar.speech-lang",
                 history: "talking-avatar.history", apiKey: "talking-avatar.api-key",
                 avatar: "talking-avatar.avatar", model: "talking-avatar.model" };
  const DEFAULT_AVATAR = "default";  // the preloaded avatar: GET /api/avatars lists it first
  const HISTORY_MAX = 5;
  // Speech language "auto" (issue #17): the same letter rules as the server's lipsync/tts/language.py.
  const AUTO = "auto";
  const DEFAULT_SPEECH = "ru";  // lipsync/tts/base.py DEFAULT_LANGUAGE: what "auto" speaks without letters
  const KAZAKH_LETTERS = "ӘәҒғҚқҢңӨөҰұҮүҺһІі";
  const LATIN_RANGES = [[0x41, 0x5A], [0x61, 0x7A], [0xC0, 0x24F], [0x1E00, 0x1EFF]];
  const CYRILLIC_RANGES = [[0x400, 0x52F]];
  const LETTER = /\p{L}/u;

  const $ = (id) => document.getElementById(id);
  const form = $("generate-form"), text = $("text"), counter = $("counter"), language = $("language");
  const detectedLine = $("detected-language");
  const audio = $("audio"), audioName = $("audio-name"), audioClear = $("audio-clear"), audioHint = $("audio-hint");
  const generate = $("generate"), progress = $("progress"), progressFill = $("progress-fill");
  const progressLabel = $("progress-label"), cancel = $("cancel"), stages = $("stages");
  const errorBox = $("error"), notice = $("notice"), health = $("health");
  const modelField = $("model-field"), modelSelect = $("model"), modelHint = $("model-hint");
  const liveVideo = $("live"), livePanel = $("live-panel"), liveStart = $("live-start"), liveControls = $("live-controls");
  const liveText = $("live-text"), liveSend = $("live-send"), liveInterrupt = $("live-interrupt");
  const liveEnd = $("live-end"), liveStatus = $("live-status");
  const avatar = $("avatar"), avatarMissing = $("avatar-missing"), player = $("player");
  const download = $("download"), stats = $("stats");
  const historyList = $("history"), historyEmpty = $("history-empty"), historyClear = $("history-clear");
  const apiKeyField = $("api-key-field"), apiKeyInput = $("api-key");
  const avatarPicker = $("avatar-picker"), avatarList = $("avatar-list"), avatarFile = $("avatar-file");
  const avatarUpload = $("avatar-upload"), avatarFileName = $("avatar-file-name"), avatarNameInput = $("avatar-name");
  const avatarSend = $("avatar-send"), avatarUploadCancel = $("avatar-upload-cancel");
  const avatarProgress = $("avatar-progress"), avatarProgressFill = $("avatar-progress-fill");
  const avatarProgressLabel = $("avatar-progress-label");
  const avatarResult = $("avatar-result"), avatarResultImage = $("avatar-result-image"), faceBox = $("face-box");
  const avatarResultText = $("avatar-result-text"), avatarResultOk = $("avatar-result-ok");
  const avatarResultDelete = $("avatar-result-delete");
  const DEFAULT_PREVIEW = avatar.getAttribute("src");  // GET /api/avatar: the preloaded avatar, full size

  const maxChars = Number(text.dataset.maxChars) || 5000;
  const maxUploadBytes = Number(audio.dataset.maxUploadBytes) || 0;
  const maxUploadMb = audioHint.dataset.mb || String(Math.floor(maxUploadBytes / 1048576));
  const maxVideoSeconds = $("avatar-hint").dataset.videoSeconds || "60";

  let uiLang = "en";
  let lastHealth = null;   // {state: loading|ready|error|unreachable, data}
  let lastError = null;    // the error shown: {code, error, status, retryAfter}
  let lastNotice = null;   // the i18n key of the notice shown
  let shownStats = null;   // {duration, frames, engine, total}
  let models = null;       // GET /api/models once loaded
  let avatarOk = null;     // null: loading, true/false: the preview image loaded or failed
  let job = null;          // the job this page follows (see submit())
  let avatars = null;      // GET /api/avatars' list (null until it has loaded)
  let selectedAvatar = String(load(KEYS.avatar, DEFAULT_AVATAR) || DEFAULT_AVATAR);
  let avatarUploadJob = null;  // {xhr, status: uploading|processing, fraction} while an avatar uploads
  let shownAvatar = null;  // the avatar entry just uploaded, shown with its face box
  let armedDelete = null;  // {id, timer}: the delete button that asks "Delete?" (a second click deletes)

  // ------------------------------------------------------------------ storage
  function load(key, fallback) {
    try {
      const raw = localStorage.getItem(key);
      return raw === null ? fallback : JSON.parse(raw);
    } catch (e) { return fallback; }
  }
  function save(key, value) {
    try { localStorage.setItem(key, JSON.stringify(value)); } catch (e) { /* private mode, quota */ }
  }

  // ------------------------------------------------------------------ API key
  // Only when the server asks for one (401 unauthorized). Fetches send it as X-API-Key; the
  // EventSource, the <video> and the download links cannot send headers, so their URLs carry
  // ?api_key= (the server accepts that on GET/HEAD).
  let apiKey = String(load(KEYS.apiKey, "") || "");
  let keyTimer = null;
  function keyHeaders(headers) {
    const out = Object.assign({}, headers);
    if (apiKey) out["X-API-Key"] = apiKey;
    return out;
  }
  function withKey(url) {
    if (!apiKey || !url) return url;
    const u = new URL(url, window.location.href);
    u.searchParams.set("api_key", apiKey);
    return u.pathname + u.search;
  }
  function showApiKeyField(focus) {
    apiKeyField.hidden = false;
    if (focus) apiKeyInput.focus();
  }
  apiKeyInput.value = apiKey;
  apiKeyField.hidden = !apiKey;
  apiKeyInput.addEventListener("input", () => {
    apiKey = apiKeyInput.value.trim();
    save(KEYS.apiKey, apiKey);
    if (lastError && lastError.code === "unauthorized") showError(null);
    renderHistory();
    clearTimeout(keyTimer);
    keyTimer = setTimeout(loadAvatars, 400);  // the avatar library belongs to the key
  });

  // --------------------------------------------------------------------- i18n
  function fill(template, vars) {
    return String(template).replace(/\{(\w+)\}/g, (m, k) => (vars && vars[k] !== undefined && vars[k] !== null ? vars[k] : m));
  }
  function t(key, vars) {
    const own = (I18N[uiLang] || {})[key];
    const value = own !== undefined ? own : (I18N.en || {})[key];
    return fill(value !== undefined ? value : key,
                Object.assign({ max: maxChars, mb: maxUploadMb, video_s: maxVideoSeconds }, vars));
  }
  function num(value, digits) {
    return new Intl.NumberFormat(uiLang, { maximumFractionDigits: digits, minimumFractionDigits: digits }).format(value);
  }
  // An error in the interface language: by its stable code, else the server's English text.
  function errorText(err) {
    const vars = { max: maxChars, mb: maxUploadMb, seconds: err.retryAfter || 10, status: err.status || "?" };
    const own = ((I18N[uiLang] || {}).errors || {})[err.code];
    if (own) return fill(own, vars);
    if (err.error) return String(err.error);
    const en = (I18N.en || {}).errors || {};
    const http = ((I18N[uiLang] || {}).errors || {}).http || en.http || "HTTP {status}";
    return fill(en[err.code] || http, vars);
  }

  function initialLang() {
    const saved = load(KEYS.uiLang, null);
    if (UI_LANGS.includes(saved)) return saved;
    const prefs = (navigator.languages && navigator.languages.length) ? navigator.languages : [navigator.language || ""];
    for (const pref of prefs) {
      const base = String(pref).toLowerCase().split(/[-_]/)[0];
      if (base === "kz") return "kk";
      if (UI_LANGS.includes(base)) return base;
    }
    return "en";
  }

  function setUiLang(lang, remember) {
    uiLang = UI_LANGS.includes(lang) ? lang : "en";
    if (remember) save(KEYS.uiLang, uiLang);
    document.documentElement.lang = uiLang;
    document.title = t("page_title");
    for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
    for (const [attr, prop] of [["placeholder", "i18nPlaceholder"], ["alt", "i18nAlt"], ["aria-label", "i18nAriaLabel"]]) {
      for (const node of document.querySelectorAll(`[data-i18n-${attr}]`)) node.setAttribute(attr, t(node.dataset[prop]));
    }
    for (const button of document.querySelectorAll("[data-ui-lang]")) {
      button.setAttribute("aria-pressed", String(button.dataset.uiLang === uiLang));
    }
    renderCounter(); renderAudioChoice(); renderHealth(); renderProgress(); renderMessages(); renderStats(); renderHistory();
    renderAvatars(); renderAvatarUpload(); renderAvatarResult(); renderModels(); renderLive();
  }

  for (const button of document.querySelectorAll("[data-ui-lang]")) {
    button.addEventListener("click", () => setUiLang(button.dataset.uiLang, true));
  }

  // ------------------------------------------------------- messages (error, notice)
  function showError(err) {
    lastError = err;
    renderMessages();
    if (err && err.code === "unauthorized") showApiKeyField(true);
  }
  function showNotice(key) { lastNotice = key; renderMessages(); }
  function renderMessages() {
    errorBox.hidden = !lastError;
    errorBox.textContent = lastError ? errorText(lastError) : "";
    errorBox.dataset.code = lastError ? (lastError.code || "") : "";
    notice.hidden = !lastNotice;
    notice.textContent = lastNotice ? t(lastNotice) : "";
  }

  // ------------------------------------------------------------- text and upload
  function renderCounter() {
    const n = text.value.length;
    counter.textContent = t("counter", { n: n, max: maxChars });
    counter.title = t("counter_label", { n: n, max: maxChars });
    counter.dataset.level = n >= maxChars ? "full" : n >= maxChars * 0.9 ? "near" : "ok";
  }
  text.addEventListener("input", () => {
    renderCounter();
    renderDetected();
    if (lastError && ["empty_text", "missing_input"].includes(lastError.code) && text.value.trim()) showError(null);
    if (lastError && lastError.code === "language_mismatch" && fitsText(language.value, detectLanguage(text.value))) showError(null);
  });
  text.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); form.requestSubmit(); }
  });

  function chosenFile() { return (audio.files && audio.files[0]) || null; }
  function renderAudioChoice() {
    const file = chosenFile();
    audioClear.hidden = !file;
    form.classList.toggle("has-recording", !!file);
    language.disabled = !!file || form.classList.contains("busy");
    audioName.textContent = file ? file.name : t("no_file");
    audioName.dataset.chosen = String(!!file);
    renderDetected();
  }

  // ---------------------------------------------------------- speech language
  // Latin letters against Cyrillic ones, the majority wins (a tie: Cyrillic); Cyrillic is Kazakh
  // as soon as one Kazakh-only letter appears; null without a Latin or Cyrillic letter.
  function inRanges(code, ranges) { return ranges.some(([low, high]) => code >= low && code <= high); }
  function detectLanguage(value) {
    let latin = 0, cyrillic = 0, kazakh = 0;
    for (const ch of String(value)) {
      if (!LETTER.test(ch)) continue;
      const code = ch.codePointAt(0);
      if (inRanges(code, LATIN_RANGES)) latin++;
      else if (inRanges(code, CYRILLIC_RANGES)) { cyrillic++; if (KAZAKH_LETTERS.includes(ch)) kazakh++; }
    }
    if (!latin && !cyrillic) return null;
    if (latin > cyrillic) return "en";
    return kazakh ? "kk" : "ru";
  }
  // What the server accepts for an explicit language (kk reads any Cyrillic text).
  function fitsText(lang, detected) { return !detected || lang === detected || (lang === "kk" && detected === "ru"); }
  // The voice the server will use for this text.
  function speechLanguage() {
    return language.value === AUTO ? (detectLanguage(text.value) || DEFAULT_SPEECH) : language.value;
  }
  function renderDetected() {
    const detected = detectLanguage(text.value);
    const auto = language.value === AUTO;
    const mismatch = !auto && !fitsText(language.value, detected);
    let message = "";
    if (detected) message = t(mismatch ? "detected_mismatch" : "detected_language", { lang: t(`language_${detected}`) });
    else if (auto && text.value.trim()) message = t("detected_none", { lang: t(`language_${DEFAULT_SPEECH}`) });
    detectedLine.hidden = !message || !!chosenFile();  // a recording needs no speech language
    if (detectedLine.textContent !== message) detectedLine.textContent = message;  // aria-live: only changes
    detectedLine.dataset.detected = detected || "";
    detectedLine.dataset.mismatch = String(mismatch);
  }
  audio.addEventListener("change", () => {
    renderAudioChoice();
    const file = chosenFile();
    if (file && maxUploadBytes && file.size > maxUploadBytes) showError({ code: "upload_too_large" });
    else if (lastError) showError(null);
  });
  audioClear.addEventListener("click", () => {
    audio.value = "";
    renderAudioChoice();
    if (lastError && lastError.code === "upload_too_large") showError(null);
    audio.focus();
  });

  const savedSpeech = load(KEYS.speechLang, null);
  language.addEventListener("change", () => {
    save(KEYS.speechLang, language.value);
    renderDetected();
    if (lastError && lastError.code === "language_mismatch") showError(null);
  });

  // ------------------------------------------------------------------ health
  function renderHealth() {
    const state = lastHealth ? lastHealth.state : "loading";
    const h = (lastHealth && lastHealth.data) || {};
    health.dataset.state = state === "unreachable" ? "error" : state;
    health.replaceChildren();
    const strong = document.createElement("strong");
    if (state === "ready") {
      strong.textContent = t("health_ready");
      const details = document.createElement("span");
      details.textContent = t("health_details", { engine: h.engine, device: h.device, tts: h.tts_provider });
      health.append(strong, details);
    } else if (state === "error") {
      strong.textContent = t("health_error");
      const details = document.createElement("span");
      details.textContent = h.error || "";
      health.append(strong, details);
    } else {
      strong.textContent = t(state === "unreachable" ? "health_unreachable" : "health_loading");
      health.append(strong);
    }
  }

  async function pollHealth() {
    let delay = 2000;
    try {
      const response = await fetch("/api/health", { cache: "no-store" });
      const h = await response.json();
      lastHealth = { state: h.status === "ready" ? "ready" : h.status === "error" ? "error" : "loading", data: h };
      if (h.status === "ready") {
        delay = 30000;
        if (avatarOk === false) showPreview(true);
        if (!avatars && avatarList.dataset.state === "error") loadAvatars();  // refused while loading
        if (!models) loadModels();
      }
    } catch (e) {
      lastHealth = { state: "unreachable", data: null };
      delay = 5000;
    }
    renderHealth();
    setTimeout(pollHealth, delay);
  }

  // ------------------------------------------------------------ screen: avatar or video
  function showScreen(which) {
    const video = which === "player", isLive = which === "live";
    player.hidden = !video;
    liveVideo.hidden = !isLive;
    avatar.hidden = video || isLive || avatarOk === false;
    avatarMissing.hidden = video || isLive || avatarOk !== false;
  }
  function currentScreen() { return !liveVideo.hidden ? "live" : player.hidden ? "avatar" : "player"; }
  avatar.addEventListener("load", () => { avatarOk = true; showScreen(currentScreen()); });
  avatar.addEventListener("error", () => { avatarOk = false; showScreen(currentScreen()); });
  if (avatar.complete) avatarOk = avatar.naturalWidth > 0;  // it may have loaded/failed before this script ran

  function setSource(url, kind) {
    player.dataset.source = kind;
    player.src = withKey(url);
    showScreen("player");
  }
  // On a phone the player is below the form: bring it into view when the video starts.
  function revealPlayer() {
    const box = player.getBoundingClientRect();
    if (box.top >= window.innerHeight || box.bottom <= 0) {
      const smooth = !window.matchMedia("(prefers-reduced-motion: reduce)").matches;
      player.scrollIntoView({ block: "nearest", behavior: smooth ? "smooth" : "auto" });
    }
  }
  function resetPlayer() {
    player.pause();
    player.removeAttribute("src");
    delete player.dataset.source;
    player.load();
    showScreen("avatar");
    download.hidden = true;
    download.removeAttribute("href");
    shownStats = null;
    renderStats();
  }
  function setDownload(url, id) {
    download.href = withKey(url);
    download.download = `avatar-${String(id).slice(0, 8)}.mp4`;
    download.hidden = false;
  }
  // The finished file replaces the live stream (seekable, with its duration), at the same moment.
  function switchToFinal(url) {
    const fromStream = player.dataset.source === "stream";
    const at = fromStream ? player.currentTime : 0;
    const userPaused = fromStream && player.paused && at > 0;
    setSource(url, "final");
    if (at > 0) {
      player.addEventListener("loadedmetadata", () => {
        try { player.currentTime = Math.min(at, player.duration || at); } catch (e) { /* not seekable yet */ }
      }, { once: true });
    }
    if (!userPaused) player.play().catch(() => {});
  }
  player.addEventListener("error", async () => {
    const source = player.dataset.source;
    if (!source || !player.getAttribute("src")) return;
    if (source === "stream") {  // the final file follows when the job is done
      if (job && job.state && job.state.status === "done") switchToFinal(job.urls.video);
      return;
    }
    if (source === "history") {
      try {
        const r = await fetch(player.getAttribute("src"), { method: "HEAD", cache: "no-store", headers: keyHeaders() });
        if (r.status === 404) {
          dropHistory(new Set([player.dataset.jobId]));
          resetPlayer();
          showError({ code: "job_not_found" });
          return;
        }
      } catch (e) { /* unreachable: report the playback error below */ }
    }
    showError({ code: "video_error" });
  });

  function renderStats() {
    stats.replaceChildren();
    stats.hidden = !shownStats;
    if (!shownStats) return;
    const rows = [];
    if (shownStats.duration != null) rows.push(["stat_duration", t("seconds", { n: num(shownStats.duration, 2) })]);
    if (shownStats.frames != null) rows.push(["stat_frames", String(shownStats.frames)]);
    if (shownStats.engine) rows.push(["stat_engine", shownStats.engine]);
    if (shownStats.total != null) rows.push(["stat_made_in", t("seconds", { n: num(shownStats.total / 1000, 1) })]);
    for (const [key, value] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = t(key);
      const dd = document.createElement("dd");
      dd.textContent = value;
      stats.append(dt, dd);
    }
  }

  // ----------------------------------------------------------- avatar library
  // GET /api/avatars: "default" (the preloaded avatar) first, then this browser's (this key's)
  // uploads. The choice is a group of radio buttons (arrow keys move it); the preview on the
  // screen shows the chosen avatar; jobs send its id as avatar_id (none for the default).
  // Thumbnails are <img>: their URLs carry ?api_key= when a key is needed, like the videos'.
  const AVATAR_ERRORS = new Set(["no_face", "several_faces", "invalid_image", "payload_too_large", "too_many_avatars",
                                 "invalid_name", "image_too_large", "unknown_avatar", "avatar_is_default"]);
  let avatarsSeq = 0;

  function findAvatar(id) { return (avatars || []).find((a) => a.id === id) || null; }
  function avatarName(entry) {
    if (!entry) return "";
    return entry.id === DEFAULT_AVATAR ? t("avatar_default_name") : String(entry.name || t("avatar_unnamed"));
  }
  function requestAvatarId() {
    return selectedAvatar !== DEFAULT_AVATAR && findAvatar(selectedAvatar) ? selectedAvatar : null;
  }
  function clearAvatarError() {
    if (lastError && AVATAR_ERRORS.has(lastError.code)) showError(null);
  }

  async function loadAvatars() {
    const seq = ++avatarsSeq;
    avatarList.dataset.state = "loading";
    let response, body = null;
    try {
      response = await fetch("/api/avatars", { cache: "no-store", headers: keyHeaders() });
      if (response.ok) body = await response.json();
    } catch (e) { response = null; }
    if (seq !== avatarsSeq) return;  // a newer load (another key) answers instead
    if (!body || !Array.isArray(body.avatars)) {
      // 503 while the models load (loaded again once ready), 401 until a key is entered.
      const unauthorized = !!response && response.status === 401;
      avatarList.dataset.state = unauthorized ? "unauthorized" : "error";
      if (unauthorized) showApiKeyField(false);
      if (!avatars) renderAvatars();
      return;
    }
    avatars = body.avatars.filter((a) => a && typeof a.id === "string");
    avatarList.dataset.state = "ready";
    if (!findAvatar(selectedAvatar)) selectedAvatar = DEFAULT_AVATAR;
    if (shownAvatar && !findAvatar(shownAvatar.id)) { shownAvatar = null; renderAvatarResult(); }
    renderAvatars();
    showPreview(false);
  }

  // The avatar on the screen, at full size: the preloaded one, or a library one by its image_url.
  function previewUrl() {
    const entry = findAvatar(selectedAvatar);
    return !entry || entry.id === DEFAULT_AVATAR ? DEFAULT_PREVIEW : withKey(entry.image_url);
  }
  function showPreview(reload) {
    let url = previewUrl();
    if (reload) url += (url.includes("?") ? "&" : "?") + "t=" + Date.now();
    avatar.dataset.avatarId = findAvatar(selectedAvatar) ? selectedAvatar : DEFAULT_AVATAR;
    if (avatar.getAttribute("src") === url) return;
    avatarOk = null;
    avatar.src = url;
  }

  function selectAvatar(id) {
    if (!findAvatar(id)) id = DEFAULT_AVATAR;
    const changed = id !== selectedAvatar;
    selectedAvatar = id;
    save(KEYS.avatar, id);
    for (const radio of avatarList.querySelectorAll("input[type=radio]")) radio.checked = radio.value === id;
    for (const item of avatarList.querySelectorAll("[data-avatar-id]")) {
      item.dataset.selected = String(item.dataset.avatarId === id);
    }
    if (changed && !player.hidden && !(job && !job.ended)) resetPlayer();  // show who will speak next
    showPreview(false);
    if (lastError && lastError.code === "unknown_avatar") showError(null);
  }

  function renderAvatars() {
    // Rebuilt on changes and on a language switch: keep the keyboard focus where it was.
    const active = document.activeElement;
    const focus = active && avatarList.contains(active)
      ? (active.dataset.deleteAvatar ? `[data-delete-avatar="${CSS.escape(active.dataset.deleteAvatar)}"]`
        : active.name === "avatar-choice" ? `input[value="${CSS.escape(active.value)}"]` : null) : null;
    for (const item of [...avatarList.querySelectorAll("[data-avatar-id]")]) item.remove();
    const addItem = avatarList.querySelector(".avatar-add-item");
    (avatars || []).forEach((entry, i) => {
      const name = avatarName(entry);
      const item = document.createElement("div");
      item.className = "avatar-item";
      item.dataset.avatarId = entry.id;
      item.dataset.selected = String(entry.id === selectedAvatar);
      const radio = document.createElement("input");
      radio.type = "radio";
      radio.name = "avatar-choice";
      radio.className = "avatar-radio";
      radio.id = `avatar-choice-${i}`;
      radio.value = entry.id;
      radio.checked = entry.id === selectedAvatar;
      const tile = document.createElement("label");
      tile.className = "avatar-tile";
      tile.htmlFor = radio.id;
      tile.title = name;
      const img = document.createElement("img");
      img.className = "avatar-thumb";
      img.alt = "";
      img.src = withKey(entry.thumbnail_url);
      const caption = document.createElement("span");
      caption.className = "avatar-name";
      caption.textContent = name;
      if (entry.kind === "video") {  // a looping clip: say so over its thumbnail, with its length
        const frame = document.createElement("span");
        frame.className = "avatar-thumb-frame";
        const badge = document.createElement("span");
        badge.className = "avatar-badge";
        badge.textContent = t("avatar_video_badge", { seconds: Number(entry.duration || 0).toFixed(1) });
        frame.append(img, badge);
        tile.append(frame, caption);
      } else {
        tile.append(img, caption);
      }
      item.append(radio, tile);
      if (entry.id !== DEFAULT_AVATAR) {
        const del = document.createElement("button");
        del.type = "button";
        del.className = "avatar-delete";
        del.dataset.deleteAvatar = entry.id;
        renderDeleteButton(del, entry);
        item.append(del);
      }
      avatarList.insertBefore(item, addItem);
    });
    if (focus) { const node = avatarList.querySelector(focus); if (node) node.focus(); }
  }

  avatarList.addEventListener("change", (event) => {
    if (event.target.name === "avatar-choice" && event.target.checked) selectAvatar(event.target.value);
  });

  // -- delete, in two steps: "×", then "Delete?" (the same button; Escape, leaving it or 6 s undo that)
  function renderDeleteButton(button, entry) {
    const armed = !!armedDelete && armedDelete.id === entry.id;
    const name = avatarName(entry);
    button.dataset.armed = String(armed);
    if (button.classList.contains("avatar-delete")) {
      button.textContent = armed ? t("avatar_delete_confirm") : "×";
      button.setAttribute("aria-label", armed ? t("avatar_delete_confirm_label", { name }) : t("avatar_delete_label", { name }));
      button.title = button.getAttribute("aria-label");
    } else {
      button.textContent = armed ? t("avatar_delete_confirm") : t("avatar_delete_this");
    }
  }
  function deleteButtons(id) {
    const out = [...avatarList.querySelectorAll(`[data-delete-avatar="${CSS.escape(id)}"]`)];
    if (shownAvatar && shownAvatar.id === id) out.push(avatarResultDelete);
    return out;
  }
  function disarmDelete() {
    if (!armedDelete) return;
    const id = armedDelete.id;
    clearTimeout(armedDelete.timer);
    armedDelete = null;
    const entry = findAvatar(id);
    if (entry) for (const button of deleteButtons(id)) renderDeleteButton(button, entry);
  }
  function pressDelete(id) {
    const entry = findAvatar(id);
    if (!entry || entry.id === DEFAULT_AVATAR) return;
    if (armedDelete && armedDelete.id === id) { disarmDelete(); deleteAvatar(entry); return; }
    disarmDelete();
    armedDelete = { id, timer: setTimeout(disarmDelete, 6000) };
    for (const button of deleteButtons(id)) renderDeleteButton(button, entry);
  }
  avatarList.addEventListener("click", (event) => {
    const button = event.target.closest("[data-delete-avatar]");
    if (button) pressDelete(button.dataset.deleteAvatar);
  });
  avatarResultDelete.addEventListener("click", () => { if (shownAvatar) pressDelete(shownAvatar.id); });
  avatarPicker.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && armedDelete && event.target.dataset && event.target.dataset.armed === "true") {
      event.preventDefault();
      disarmDelete();
    }
  });
  avatarPicker.addEventListener("focusout", (event) => {
    if (armedDelete && event.target.dataset && event.target.dataset.armed === "true") disarmDelete();
  });

  async function deleteAvatar(entry) {
    clearAvatarError();
    let response;
    try {
      response = await fetch(entry.url || `/api/avatars/${encodeURIComponent(entry.id)}`,
                             { method: "DELETE", headers: keyHeaders() });
    } catch (e) {
      showError({ code: "network" });
      return;
    }
    if (response.status !== 204 && response.status !== 404) {  // 404: already gone
      showError(await readError(response));
      return;
    }
    const focusNext = avatarList.contains(document.activeElement) || document.activeElement === avatarResultDelete
      || document.activeElement === document.body;
    avatars = (avatars || []).filter((a) => a.id !== entry.id);
    if (shownAvatar && shownAvatar.id === entry.id) { shownAvatar = null; renderAvatarResult(); }
    if (selectedAvatar === entry.id) selectAvatar(DEFAULT_AVATAR);
    renderAvatars();
    if (focusNext) {  // the deleted button took the focus with it: the chosen avatar gets it
      const radio = avatarList.querySelector("input[type=radio]:checked");
      if (radio) radio.focus();
    }
  }

  // -- upload: choose a photo ("+"), an optional name, Upload; XHR for the upload's progress
  function chosenAvatarFile() { return (avatarFile.files && avatarFile.files[0]) || null; }
  function fileStem(name) { return String(name || "").replace(/\.[^.]*$/, "").replace(/[_\s]+/g, " ").trim().slice(0, 80); }

  function renderAvatarUpload() {
    const file = chosenAvatarFile();
    const up = avatarUploadJob;
    avatarUpload.hidden = !file && !up;
    avatarFileName.textContent = file ? file.name : "";
    avatarNameInput.placeholder = file ? fileStem(file.name) : "";
    avatarNameInput.readOnly = !!up;
    avatarFile.disabled = !!up;  // one upload at a time
    avatarSend.hidden = !!up;
    avatarProgress.hidden = !up;
    if (!up) return;
    const pct = up.status === "processing" ? 100 : Math.round((up.fraction || 0) * 100);
    avatarProgressLabel.textContent = up.status === "processing" ? t("avatar_processing") : t("avatar_uploading", { n: pct });
    avatarProgressFill.style.width = `${pct}%`;  // CSSOM: allowed under a CSP without 'unsafe-inline'
    avatarProgress.dataset.status = up.status;
    avatarProgress.setAttribute("aria-valuenow", String(pct));
    avatarProgress.setAttribute("aria-valuetext", avatarProgressLabel.textContent);
  }

  function resetAvatarUpload() {
    avatarFile.value = "";
    avatarNameInput.value = "";
    renderAvatarUpload();
  }

  avatarFile.addEventListener("change", () => {
    if (avatarUploadJob) return;
    clearAvatarError();
    const file = chosenAvatarFile();
    if (file && maxUploadBytes && file.size > maxUploadBytes) {
      resetAvatarUpload();
      showError({ code: "payload_too_large" });
      return;
    }
    if (file) { shownAvatar = null; renderAvatarResult(); }
    renderAvatarUpload();
    if (file) avatarNameInput.focus();
  });
  avatarNameInput.addEventListener("keydown", (event) => {
    // Enter here uploads the photo; it must not submit the form (which makes a video).
    if (event.key === "Enter") { event.preventDefault(); if (!avatarUploadJob) uploadAvatar(); }
  });
  avatarSend.addEventListener("click", () => uploadAvatar());
  avatarUploadCancel.addEventListener("click", () => {
    if (avatarUploadJob) avatarUploadJob.xhr.abort();
    avatarUploadJob = null;
    resetAvatarUpload();
    clearAvatarError();
    avatarFile.focus();
  });

  function uploadAvatar() {
    const file = chosenAvatarFile();
    if (!file || avatarUploadJob) return;
    clearAvatarError();
    const data = new FormData();
    data.append("avatar", file, file.name);
    const name = avatarNameInput.value.trim() || fileStem(file.name);
    if (name) data.append("name", name.slice(0, 80));
    const xhr = new XMLHttpRequest();
    const up = { xhr, status: "uploading", fraction: 0 };
    avatarUploadJob = up;
    xhr.open("POST", "/api/avatars");
    for (const [header, value] of Object.entries(keyHeaders())) xhr.setRequestHeader(header, value);
    xhr.upload.addEventListener("progress", (event) => {
      if (avatarUploadJob !== up || !event.lengthComputable) return;
      up.fraction = event.total ? event.loaded / event.total : 0;
      renderAvatarUpload();
    });
    // All sent: the server now finds the face and prepares the avatar (a second or two).
    xhr.upload.addEventListener("load", () => { if (avatarUploadJob === up) { up.status = "processing"; renderAvatarUpload(); } });
    xhr.addEventListener("load", () => {
      if (avatarUploadJob !== up) return;
      avatarUploadJob = null;
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
      if (xhr.status === 201 && body && typeof body.id === "string") {
        resetAvatarUpload();
        avatarAdded(body);
        return;
      }
      renderAvatarUpload();
      const retry = Number(xhr.getResponseHeader("Retry-After")) || (body && Number(body.retry_after)) || null;
      const err = { code: body && body.code, error: body && body.error, status: xhr.status, retryAfter: retry };
      if (xhr.status === 413 && !err.code) err.code = "payload_too_large";  // refused by a proxy
      showError(err);
    });
    xhr.addEventListener("error", () => {
      if (avatarUploadJob !== up) return;
      avatarUploadJob = null;
      renderAvatarUpload();
      showError({ code: "network" });
    });
    renderAvatarUpload();
    xhr.send(data);
  }

  function avatarAdded(entry) {
    avatars = avatars || [];
    const at = avatars.length && avatars[0].id === DEFAULT_AVATAR ? 1 : 0;  // newest first, after the default
    avatars.splice(at, 0, entry);
    renderAvatars();
    selectAvatar(entry.id);
    shownAvatar = entry;
    renderAvatarResult();
    avatarResultOk.focus();
  }

  // The new avatar with its face box: the thumbnail is the whole picture, scaled, so the box is
  // placed in percentages of the picture (face_box is in pixels of width x height).
  function renderAvatarResult() {
    avatarResult.hidden = !shownAvatar;
    if (!shownAvatar) { avatarResultImage.removeAttribute("src"); return; }
    const entry = shownAvatar;
    const url = withKey(entry.thumbnail_url);
    if (avatarResultImage.getAttribute("src") !== url) avatarResultImage.src = url;
    avatarResultImage.dataset.avatarId = entry.id;
    avatarResultText.textContent = t(entry.kind === "video" ? "avatar_added_video" : "avatar_added",
                                     { name: avatarName(entry), seconds: Number(entry.duration || 0).toFixed(1),
                                       fps: Number(entry.fps || 0).toFixed(2).replace(/\.?0+$/, "") });
    renderDeleteButton(avatarResultDelete, entry);
    const [x1, y1, x2, y2] = Array.isArray(entry.face_box) ? entry.face_box.map(Number) : [0, 0, 0, 0];
    const w = Number(entry.width) || 1, h = Number(entry.height) || 1;
    const box = faceBox.style;
    box.left = `${(100 * x1) / w}%`;
    box.top = `${(100 * y1) / h}%`;
    box.width = `${(100 * (x2 - x1)) / w}%`;
    box.height = `${(100 * (y2 - y1)) / h}%`;
    faceBox.hidden = !(x2 > x1 && y2 > y1);
  }
  avatarResultOk.addEventListener("click", () => {
    const id = shownAvatar && shownAvatar.id;
    shownAvatar = null;
    renderAvatarResult();
    const radio = id && avatarList.querySelector(`input[value="${CSS.escape(id)}"]`);
    if (radio) radio.focus();
  });

  // ------------------------------------------------------------------ models
  // The lip-sync models the server loaded (GET /api/models). With only the built-in one there is
  // nothing to choose: the picker stays hidden. "Automatic" sends no model: the chosen avatar's
  // preferred model, else the server's default.
  async function loadModels() {
    try {
      const response = await fetch("/api/models", { cache: "no-store" });
      const list = response.ok ? await response.json() : null;
      models = Array.isArray(list) ? list : null;
    } catch (e) {
      models = null;  // loading, or unreachable: health polling tries again
    }
    const saved = load(KEYS.model, "");
    if (models && models.some((m) => m.name === saved)) modelSelect.value = saved;
    renderModels();
  }

  function renderModels() {
    const choosable = !!models && models.some((m) => m.engine !== "builtin");
    modelField.hidden = !choosable;
    if (!choosable) return;
    const chosen = modelSelect.value || load(KEYS.model, "");
    const fallback = models.find((m) => m.default) || models[0];
    const options = [["", t("model_auto", { name: fallback.name })],
                     ...models.map((m) => [m.name, m.default ? t("model_default", { name: m.name }) : m.name])];
    modelSelect.replaceChildren(...options.map(([value, label]) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = label;
      return option;
    }));
    modelSelect.value = options.some(([value]) => value === chosen) ? chosen : "";
    const picked = models.find((m) => m.name === modelSelect.value);
    modelHint.textContent = picked ? (picked.description || t("model_no_description"))
      : t("model_auto_hint", { name: fallback.name });
  }
  modelSelect.addEventListener("change", () => { save(KEYS.model, modelSelect.value); renderModels(); });

  // ------------------------------------------------------------------ live conversation
  // POST /api/sessions, then a WebSocket for the conversation and the session's endless
  // fragmented MP4 fed into Media Source Extensions (the <video> stays near the live edge).
  let live = null;  // {id, ws, media, buffer, pending, speaking, interruptAt, ended}

  function renderLive() {
    const on = !!live;
    livePanel.dataset.state = on ? (live.speaking ? "speaking" : "listening") : "off";
    liveStart.hidden = on;
    liveControls.hidden = !on;
    if (on) {
      liveStatus.textContent = live.speaking ? t("live_speaking", { text: snippet(live.speaking) })
        : t(live.ready ? "live_listening" : "live_connecting");
    }
  }

  async function startLive() {
    if (live) return;
    showError(null);
    const body = { language: language.value };
    const avatarId = requestAvatarId();
    if (avatarId) body.avatar_id = avatarId;
    if (modelSelect.value) body.model = modelSelect.value;
    liveStart.disabled = true;
    let response, state;
    try {
      response = await fetch("/api/sessions", { method: "POST", headers: keyHeaders({ "Content-Type": "application/json" }),
                                               body: JSON.stringify(body) });
      state = await response.json();
    } catch (e) {
      liveStart.disabled = false;
      showError({ code: "network" });
      return;
    }
    liveStart.disabled = false;
    if (response.status !== 201) {
      showError({ code: state && state.code, error: state && state.error, status: response.status });
      return;
    }
    live = { id: state.id, speaking: null, ready: false, pending: [], buffer: null, interruptAt: null };
    livePanel.dataset.sessionId = state.id;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    live.ws = new WebSocket(`${scheme}//${location.host}${withKey(state.ws_url)}`);
    live.ws.addEventListener("message", (event) => liveEvent(JSON.parse(event.data)));
    live.ws.addEventListener("close", () => { if (live && live.id === state.id) stopLive(false); });
    playLive(state.video_url);
    renderLive();
    liveText.focus();
  }

  function liveEvent(event) {
    if (!live) return;
    if (event.type === "ready") live.ready = true;
    else if (event.type === "speaking_started") live.speaking = event.text;
    else if (event.type === "speaking_ended") {
      live.speaking = null;
      if (event.interrupted && live.interruptAt !== null) {
        // How long the speech the viewer hears goes on after the click: the time in the video
        // where it stopped, minus where the player was at the click.
        livePanel.dataset.interruptDelay = String(Math.max(0, event.at - live.interruptAt));
        live.interruptAt = null;
      }
    } else if (event.type === "error") showError({ code: event.code, error: event.error });
    else if (event.type === "closed") { stopLive(false); return; }
    const log = livePanel.dataset.events ? JSON.parse(livePanel.dataset.events) : [];
    log.push({ type: event.type, at: event.at, text: event.text, interrupted: event.interrupted });
    livePanel.dataset.events = JSON.stringify(log.slice(-20));
    renderLive();
  }

  function playLive(url) {
    const media = new MediaSource();
    live.media = media;
    liveVideo.src = URL.createObjectURL(media);
    showScreen("live");
    media.addEventListener("sourceopen", async () => {
      const mine = live;
      let response;
      try {
        response = await fetch(withKey(url), { headers: keyHeaders() });
      } catch (e) { return; }
      const reader = response.body.getReader();
      while (live === mine) {
        const { value, done } = await reader.read();
        if (done) break;
        mine.pending.push(value);
        feedLive(mine);
      }
      reader.cancel().catch(() => {});
    }, { once: true });
  }

  // The codecs of the stream, from its init segment's avcC box (profile, compatibility, level).
  function streamCodecs(bytes) {
    for (let i = 4; i + 8 < bytes.length; i++) {
      if (bytes[i] === 0x61 && bytes[i + 1] === 0x76 && bytes[i + 2] === 0x63 && bytes[i + 3] === 0x43) {
        const hex = (n) => n.toString(16).padStart(2, "0");
        return `avc1.${hex(bytes[i + 5])}${hex(bytes[i + 6])}${hex(bytes[i + 7])},mp4a.40.2`;
      }
    }
    return null;
  }

  function feedLive(mine) {
    if (!mine.buffer) {
      const head = new Uint8Array(mine.pending.reduce((n, c) => n + c.length, 0));
      let at = 0;
      for (const chunk of mine.pending) { head.set(chunk, at); at += chunk.length; }
      const codecs = streamCodecs(head);
      if (!codecs) return;  // the init segment is not complete yet
      mine.buffer = mine.media.addSourceBuffer(`video/mp4; codecs="${codecs}"`);
      mine.buffer.addEventListener("updateend", () => feedLive(mine));
      mine.pending = [head];
    }
    const buffer = mine.buffer;
    if (buffer.updating || !mine.pending.length || mine.media.readyState !== "open") return;
    const ranges = buffer.buffered;
    if (ranges.length) {
      const end = ranges.end(ranges.length - 1), lag = end - liveVideo.currentTime;
      // Stay close to the live edge (what is said, and an interrupt, reach the viewer sooner):
      // a little faster while behind, a jump when far behind (a stall, a hidden tab).
      if (lag > 1.0) liveVideo.currentTime = end - 0.1;
      liveVideo.playbackRate = lag > 0.2 ? 1.15 : 1.0;
      if (liveVideo.currentTime - ranges.start(0) > 60) { buffer.remove(0, liveVideo.currentTime - 30); return; }
    }
    buffer.appendBuffer(mine.pending.shift());
    if (liveVideo.paused) liveVideo.play().catch(() => {});
  }

  function sendLive(message) {
    if (live && live.ws.readyState === WebSocket.OPEN) live.ws.send(JSON.stringify(message));
  }

  function stopLive(tellServer) {
    if (!live) return;
    const ending = live;
    live = null;
    if (tellServer && ending.ws.readyState === WebSocket.OPEN) ending.ws.send(JSON.stringify({ type: "close" }));
    ending.ws.close();
    liveVideo.pause();
    liveVideo.removeAttribute("src");
    liveVideo.load();
    showScreen(player.getAttribute("src") ? "player" : "avatar");
    renderLive();
  }

  liveStart.addEventListener("click", startLive);
  liveSend.addEventListener("click", () => {
    const value = liveText.value.trim();
    if (!value) { liveText.focus(); return; }
    sendLive({ type: "text", text: value + " ", final: true });
    liveText.value = "";
    liveText.focus();
  });
  liveText.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); liveSend.click(); }
  });
  liveInterrupt.addEventListener("click", () => {
    if (!live) return;
    sendLive({ type: "interrupt" });
    // Barge-in: skip what is already buffered ahead of the player, so what the viewer hears
    // stops as soon as the server stops (the player runs up to 0.3 s behind the live edge).
    const ranges = liveVideo.buffered;
    if (ranges.length) liveVideo.currentTime = Math.max(liveVideo.currentTime, ranges.end(ranges.length - 1) - 0.05);
    live.interruptAt = liveVideo.currentTime;
  });
  liveEnd.addEventListener("click", () => stopLive(true));

  // -------------------------------------------------------------------- jobs
  // Cancel is switched off with aria-disabled, not `disabled`: a disabled button loses focus.
  function setCancelUsable(usable) { cancel.setAttribute("aria-disabled", String(!usable)); }
  function cancelUsable() { return cancel.getAttribute("aria-disabled") !== "true"; }

  function setBusy(busy) {
    const cancelHadFocus = document.activeElement === cancel;
    form.classList.toggle("busy", busy);
    form.setAttribute("aria-busy", String(busy));
    generate.hidden = busy;
    progress.hidden = !busy;
    stages.hidden = !busy;
    cancel.hidden = !busy;
    text.readOnly = busy;
    audio.disabled = busy;
    audioClear.disabled = busy;
    avatarPicker.disabled = busy;  // the job uses the avatar chosen when it started
    renderAudioChoice();
    if (!busy && cancelHadFocus) generate.focus();
  }

  // For a recording, the "tts" stage is reading (decoding) the upload.
  function stageKey(stage) {
    return stage === "tts" && job && job.entry.kind === "recording" ? "stage_rec" : `stage_${stage}`;
  }
  function stageText(state) {
    if (!state) return t("stage_starting");
    if (state.status === "queued") return state.queue_position ? t("stage_queued_n", { n: state.queue_position }) : t("stage_queued");
    if (state.status === "done") return t("stage_done");
    if (STAGES.includes(state.stage)) return t(`${stageKey(state.stage)}_long`);
    return t("stage_starting");
  }

  function renderProgress() {
    if (!job) return;
    const state = job.state;
    const pct = state ? Math.round((state.status === "done" ? 1 : state.progress || 0) * 100) : 0;
    const label = stageText(state);
    progressLabel.textContent = state && state.status !== "queued" ? t("progress_label", { stage: label, n: pct }) : label;
    progressFill.style.width = `${pct}%`;  // CSSOM: allowed under a CSP without 'unsafe-inline'
    progress.setAttribute("aria-valuenow", String(pct));
    progress.setAttribute("aria-valuetext", progressLabel.textContent);
    progress.dataset.status = state ? state.status : "starting";
    progress.dataset.stage = (state && state.stage) || "";
    const current = state ? STAGES.indexOf(state.stage) : -1;
    for (const item of stages.children) {
      const index = STAGES.indexOf(item.dataset.stage);
      item.textContent = t(stageKey(item.dataset.stage));
      item.dataset.state = (state && state.status === "done") || (current >= 0 && index < current) ? "done"
        : index === current && state.status === "running" ? "active" : "pending";
    }
  }

  async function readError(response) {
    let body = null;
    try { body = await response.json(); } catch (e) { /* not JSON */ }
    const retry = Number(response.headers.get("Retry-After")) || (body && Number(body.retry_after)) || null;
    return { code: body && body.code, error: body && body.error, status: response.status, retryAfter: retry };
  }

  form.addEventListener("submit", (event) => { event.preventDefault(); submit(); });

  async function submit() {
    if (job && !job.ended) return;
    showError(null);
    showNotice(null);
    const file = chosenFile();
    if (!file && !text.value.trim()) { showError({ code: "empty_text" }); text.focus(); return; }
    if (file && maxUploadBytes && file.size > maxUploadBytes) { showError({ code: "upload_too_large" }); return; }
    if (!file && text.value.length > maxChars) { showError({ code: "text_too_long" }); return; }

    let body;
    const headers = {};
    const avatarId = requestAvatarId();  // only for a library avatar: the default one needs no field
    if (file) {
      body = new FormData();
      body.append("audio", file, file.name);
      if (avatarId) body.append("avatar_id", avatarId);
      if (modelSelect.value) body.append("model", modelSelect.value);
    } else {
      const fields = { text: text.value, language: language.value };  // "auto" until a language is picked
      if (avatarId) fields.avatar_id = avatarId;
      if (modelSelect.value) fields.model = modelSelect.value;
      body = JSON.stringify(fields);
      headers["Content-Type"] = "application/json";
    }
    const mine = { id: null, urls: null, state: null, ended: false, events: null, timer: null, streaming: false,
                   entry: file ? { kind: "recording", name: file.name }
                               : { kind: "text", text: text.value.trim().slice(0, 200), language: speechLanguage() } };
    if (avatarId) mine.entry.avatar = avatarName(findAvatar(avatarId));
    // The Generate button is about to hide: keyboard focus goes to Cancel once that is usable.
    const moveFocus = document.activeElement === generate || document.activeElement === document.body;
    job = mine;
    resetPlayer();
    setBusy(true);
    setCancelUsable(false);  // until the job has an id
    renderProgress();
    if (moveFocus) cancel.focus();

    let response;
    try {
      response = await fetch("/api/jobs", { method: "POST", body: body, headers: keyHeaders(headers) });
    } catch (e) {
      endJob(mine);
      showError({ code: "network" });
      return;
    }
    if (!response.ok) {
      const err = await readError(response);
      endJob(mine);
      showError(err);
      if (err.code === "unknown_avatar") loadAvatars();  // deleted meanwhile (another tab)
      return;
    }
    let state;
    try { state = await response.json(); } catch (e) { state = null; }
    if (!state || !state.id) {
      endJob(mine);
      showError({ code: null, status: response.status });
      return;
    }
    mine.id = state.id;
    mine.urls = { status: state.status_url, events: state.events_url, video: state.video_url, stream: state.stream_url };
    setCancelUsable(true);
    apply(mine, state);
    if (!mine.ended) follow(mine);
  }

  function follow(mine) {
    if (!window.EventSource) { poll(mine); return; }
    const events = new EventSource(withKey(mine.urls.events));
    mine.events = events;
    events.addEventListener("message", (event) => {
      let state;
      try { state = JSON.parse(event.data); } catch (e) { return; }
      apply(mine, state);
    });
    events.addEventListener("error", () => {
      // CONNECTING: the browser reconnects by itself; CLOSED: give up on SSE and poll.
      if (!mine.ended && events.readyState === EventSource.CLOSED) { mine.events = null; poll(mine); }
    });
  }

  async function poll(mine) {
    if (mine.ended) return;
    try {
      const response = await fetch(mine.urls.status, { cache: "no-store", headers: keyHeaders() });
      if (response.status >= 400 && response.status < 500 && response.status !== 429) {
        const err = await readError(response);  // gone (404), key refused (401), ...
        endJob(mine);
        resetPlayer();
        showError(err);
        return;
      }
      if (response.ok) apply(mine, await response.json());
    } catch (e) { /* try again */ }
    if (!mine.ended) mine.timer = setTimeout(() => poll(mine), 1000);
  }

  function apply(mine, state) {
    if (mine !== job || mine.ended || !state || state.id !== mine.id) return;
    if (mine.state && state.status === mine.state.status && (state.progress || 0) < (mine.state.progress || 0)) return;
    mine.state = state;
    renderProgress();
    if (state.status === "running" && !mine.streaming) {
      mine.streaming = true;
      setSource(mine.urls.stream, "stream");  // plays while the rest is being made
      showNotice("streaming");
      player.play().catch(() => {});
      revealPlayer();
    }
    if (state.status === "done") {
      finishDone(mine, state);
    } else if (state.status === "failed") {
      endJob(mine);
      resetPlayer();
      showNotice(null);
      showError(state.error || { code: "internal_error" });
    } else if (state.status === "cancelled") {
      endJob(mine);
      resetPlayer();
      showNotice("cancelled");
    }
  }

  function endJob(mine) {
    mine.ended = true;
    if (mine.events) { mine.events.close(); mine.events = null; }
    clearTimeout(mine.timer);
    if (job === mine) setBusy(false);
  }

  function finishDone(mine, state) {
    endJob(mine);
    showNotice(null);
    setDownload(mine.urls.video, mine.id);
    player.dataset.jobId = mine.id;
    switchToFinal(mine.urls.video);
    shownStats = { duration: state.duration, frames: state.frames, engine: state.engine,
                   total: state.timings ? state.timings.total : null };
    renderStats();
    addHistory(Object.assign({ id: mine.id, video_url: mine.urls.video, duration: state.duration, at: Date.now() }, mine.entry));
  }

  cancel.addEventListener("click", async () => {
    const mine = job;
    if (!mine || mine.ended || !mine.id || !cancelUsable()) return;
    setCancelUsable(false);
    let response;
    try {
      response = await fetch(mine.urls.status, { method: "DELETE", headers: keyHeaders() });
    } catch (e) {
      setCancelUsable(true);
      showError({ code: "network" });
      return;
    }
    if (response.status === 200) {
      apply(mine, await response.json());
    } else if (response.status === 204 || response.status === 404) {
      // Already ended and now deleted (a finished job's DELETE removes it), or expired.
      if (!mine.ended) endJob(mine);
      if (job === mine) { resetPlayer(); showNotice("cancelled"); }
      dropHistory(new Set([mine.id]));
    } else {
      showError(await readError(response));
    }
    if (!mine.ended) setCancelUsable(true);
  });

  // ----------------------------------------------------------------- history
  function loadHistory() {
    const list = load(KEYS.history, []);
    return Array.isArray(list)
      ? list.filter((e) => e && typeof e.id === "string" && typeof e.video_url === "string"
                           && e.video_url.startsWith("/") && !e.video_url.startsWith("//"))
      : [];
  }
  function addHistory(entry) {
    save(KEYS.history, [entry].concat(loadHistory().filter((e) => e.id !== entry.id)).slice(0, HISTORY_MAX));
    renderHistory();
  }
  function dropHistory(ids) {
    save(KEYS.history, loadHistory().filter((e) => !ids.has(e.id)));
    renderHistory();
  }
  function snippet(value) {
    const s = String(value || "").replace(/\s+/g, " ").trim();
    return s.length > 80 ? s.slice(0, 79) + "…" : s;
  }
  function renderHistory() {
    const list = loadHistory();
    historyList.replaceChildren();
    historyEmpty.hidden = list.length > 0;
    historyClear.hidden = list.length === 0;
    const when = new Intl.DateTimeFormat(uiLang, { dateStyle: "short", timeStyle: "short" });
    for (const entry of list) {
      const item = document.createElement("li");
      item.dataset.jobId = entry.id;
      const main = document.createElement("div");
      main.className = "history-main";
      const title = document.createElement("span");
      title.className = "history-text";
      title.textContent = entry.kind === "recording" ? t("history_recording", { name: entry.name || "" }) : snippet(entry.text);
      const meta = document.createElement("span");
      meta.className = "history-meta";
      const at = new Date(Number(entry.at));
      if (!isNaN(at.getTime())) {
        const time = document.createElement("time");
        time.dateTime = at.toISOString();
        time.textContent = when.format(at);
        meta.append(time);
      }
      if (typeof entry.duration === "number") meta.append(` · ${t("seconds", { n: num(entry.duration, 1) })}`);
      if (entry.language) meta.append(` · ${String(entry.language).toUpperCase()}`);
      if (typeof entry.avatar === "string" && entry.avatar) meta.append(` · ${snippet(entry.avatar)}`);
      main.append(title, meta);
      const actions = document.createElement("div");
      actions.className = "history-actions";
      const play = document.createElement("button");
      play.type = "button";
      play.className = "link";
      play.dataset.play = entry.id;
      play.textContent = t("history_play");
      const link = document.createElement("a");
      link.href = withKey(entry.video_url);
      link.download = `avatar-${entry.id.slice(0, 8)}.mp4`;
      link.textContent = t("history_download");
      actions.append(play, link);
      item.append(main, actions);
      historyList.append(item);
    }
  }
  historyList.addEventListener("click", (event) => {
    const button = event.target.closest("[data-play]");
    if (!button) return;
    const entry = loadHistory().find((e) => e.id === button.dataset.play);
    if (!entry || (job && !job.ended)) return;
    showError(null);
    showNotice(null);
    player.dataset.jobId = entry.id;
    setSource(entry.video_url, "history");
    setDownload(entry.video_url, entry.id);
    shownStats = { duration: entry.duration, frames: null, engine: null, total: null };
    renderStats();
    player.play().catch(() => {});
  });
  historyClear.addEventListener("click", () => { save(KEYS.history, []); renderHistory(); });

  // Results expire on the server: drop the entries whose video is gone (404).
  async function pruneHistory() {
    const list = loadHistory();
    const gone = await Promise.all(list.map(async (entry) => {
      try {
        const response = await fetch(entry.video_url, { method: "HEAD", cache: "no-store", headers: keyHeaders() });
        return response.status === 404 || response.status === 410;
      } catch (e) { return false; }  // offline: keep it
    }));
    const stale = new Set(list.filter((entry, i) => gone[i]).map((entry) => entry.id));
    if (stale.size) dropHistory(stale);
    historyList.dataset.checked = "true";
  }

  // -------------------------------------------------------------------- start
  if (savedSpeech && [...language.options].some((o) => o.value === savedSpeech)) language.value = savedSpeech;
  else language.value = AUTO;  // until the person picks a language: the text decides, not the interface
  setUiLang(initialLang(), false);
  showScreen("avatar");
  showPreview(false);
  pollHealth();
  pruneHistory();
  loadAvatars();
  loadModels();
})();
