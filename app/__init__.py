"""The tagging app: a web page that proxies to TorchServe (``app.web``) and a batch tagger that
writes GPS EXIF into copies of photos (``app.tag``)."""
