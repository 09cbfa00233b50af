"""Other libraries' models, recognised without importing them: transformers'
``generate()``, and sentence-transformers' ``encode()`` and its variants."""
