"""The official weight files: manifest (where each lives), verification (size, md5) and downloader + CLI."""
