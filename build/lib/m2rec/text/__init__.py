"""Item text embeddings from a pretrained language model (the semantic branch's input)."""
