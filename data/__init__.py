"""Data pipeline: tokenizers, dataset preparation into token files, batch loading.

Modules, one job each:
- `data.tokenizer`: GPT-2 (tiktoken, shipped ranks) or a Hugging Face tokenizer.json, one interface;
- `data.sources`: text sources (Hugging Face, local files) and the built-in corpora, one table by name (`KNOWN`);
- `data.prepare`: `python data/prepare.py SOURCE` -> data/<name>/{train.bin,val.bin,meta.json};
- `data.meta`: reading and writing meta.json, the marker of a complete dataset;
- `data.loader`: `BatchLoader`, random (x, y) batches from the token files.

Design choice: this package imports nothing heavy, so `import data.prepare` does not pull in
torch, and tokenizer workers start fast; import `data.loader` where batches are needed.
"""

from data.errors import DataError
from data.meta import read_meta
from data.tokenizer import Tokenizer, gpt2, load_tokenizer, tokenizer_from_record

__all__ = ["DataError", "Tokenizer", "gpt2", "load_tokenizer", "read_meta", "tokenizer_from_record"]
