"""Cove's secure file system: the encrypted file format (Gramine protected files v2).

``ProtectedFile`` is the API; ``FileIntegrityError`` is raised for any tamper.
"""

from cove.fs.errors import FileIntegrityError, ProtectedFileError
from cove.fs.protected_file import DEFAULT_CACHE_BYTES, ProtectedFile, read_header

__all__ = ["DEFAULT_CACHE_BYTES", "FileIntegrityError", "ProtectedFile", "ProtectedFileError", "read_header"]
