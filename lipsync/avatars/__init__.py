"""The avatar library (``library.AvatarLibrary``): uploaded avatars prepared once and kept on disk."""
