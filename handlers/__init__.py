"""TorchServe serving: the handler, the archive builder and the server controller."""
