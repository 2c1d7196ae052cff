// The page: health badge, character counter, generate (text or recording), player, stats.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const form = $("generate-form"), text = $("text"), counter = $("counter"), button = $("generate");
  const errorBox = $("error"), player = $("player"), download = $("download"), stats = $("stats");
  const maxChars = Number(document.currentScript.dataset.maxChars);
  let lastUrl = null;

  function showError(message) { errorBox.textContent = message; errorBox.hidden = !message; }

  function updateCounter() { counter.textContent = `${text.value.length} / ${maxChars}`; }
  text.addEventListener("input", updateCounter);
  updateCounter();

  async function pollHealth() {
    const badge = $("health");
    try {
      const r = await fetch("/api/health");
      const h = await r.json();
      badge.dataset.state = h.status;
      badge.textContent = h.status === "ready"
        ? `Ready · engine ${h.engine} · ${h.device} · TTS ${h.tts_provider}`
        : h.status === "error" ? `Error: ${h.error}` : "Loading models…";
      if (h.status === "ready") { $("avatar").src = "/api/avatar?" + Date.now(); return; }
    } catch (e) { badge.textContent = "Server unreachable"; badge.dataset.state = "error"; }
    setTimeout(pollHealth, 2000);
  }
  pollHealth();

  function showStats(response) {
    stats.innerHTML = "";
    const rows = [["Video", `${response.headers.get("X-Video-Duration")} s, ${response.headers.get("X-Video-Frames")} frames`],
                  ["Engine", response.headers.get("X-Engine")],
                  ["Total", `${response.headers.get("X-Processing-Time")} s`]];
    for (const part of (response.headers.get("Server-Timing") || "").split(",")) {
      const m = part.trim().match(/^(\w+);dur=([\d.]+)$/);
      if (m && m[1] !== "total") rows.push([m[1], `${(Number(m[2]) / 1000).toFixed(2)} s`]);
    }
    for (const [k, v] of rows) {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      stats.append(dt, dd);
    }
    stats.hidden = false;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError("");
    const file = $("audio").files[0];
    if (!file && !text.value.trim()) { showError("Please type some text or choose a recording."); return; }
    let body, headers = {};
    if (file) { body = new FormData(); body.append("audio", file); }
    else { body = JSON.stringify({ text: text.value, language: $("language").value }); headers["Content-Type"] = "application/json"; }
    button.disabled = true; button.textContent = "Generating…";
    try {
      const response = await fetch("/api/generate", { method: "POST", body, headers });
      if (!response.ok) {
        let message = `Request failed (${response.status})`;
        try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
        showError(message);
        return;
      }
      const blob = await response.blob();
      if (lastUrl) URL.revokeObjectURL(lastUrl);
      lastUrl = URL.createObjectURL(blob);
      player.src = lastUrl; player.hidden = false; $("avatar").hidden = true;
      download.href = lastUrl; download.hidden = false;
      showStats(response);
      player.play().catch(() => {});
    } catch (e) {
      showError("The server could not be reached.");
    } finally {
      button.disabled = false; button.textContent = "Generate";
    }
  });
})();
