"""The local review web app (`spotmatch serve`)."""
