"""Scripts ``ncl-launch`` runs by path (a directory of their own: the script's directory
becomes the first entry of ``sys.path`` and must not shadow any module)."""
