"""Where the face is in the avatar image.

``FaceLocator(...).locate(image_bgr) -> FaceBox`` is the one entry point the
pipeline uses: a manual override, a cached box, or a detection by S3FD (the
detector Wav2Lip was trained with, when ``s3fd.pth`` is installed) or by
OpenCV's Haar cascades mapped to S3FD framing (offline fallback). It raises
``NoFaceError`` (HTTP 422, code ``no_face``) when the image has no face.

Importing this package does not import torch; ``lipsync.faces.s3fd`` does.
"""

from lipsync.errors import NoFaceError
from lipsync.faces.box import FaceBox
from lipsync.faces.locator import FaceLocator

__all__ = ["FaceBox", "FaceLocator", "NoFaceError"]
