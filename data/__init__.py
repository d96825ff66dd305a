"""Data pipeline: GPT-2 tokenizer, dataset preparation into token files, batch loading.

Modules, one job each:
- `data.tokenizer`: the GPT-2 tiktoken encoding, found offline (see its docstring);
- `data.sources`: text sources (Hugging Face, local files, the offline pydocs/pystdlib corpora);
- `data.prepare`: `python data/prepare.py SOURCE` -> data/<name>/{train.bin,val.bin,meta.json};
- `data.meta`: reading and writing meta.json, the marker of a complete dataset;
- `data.loader`: `BatchLoader`, random (x, y) batches from the token files.

Design choice: this package imports nothing heavy, so `import data.prepare` does not pull in
torch, and tokenizer workers start fast; import `data.loader` where batches are needed.
"""

from data.errors import DataError
from data.meta import read_meta
from data.tokenizer import EOT_ID, VOCAB_SIZE, decode, encode, get_tokenizer

__all__ = ["DataError", "EOT_ID", "VOCAB_SIZE", "decode", "encode", "get_tokenizer", "read_meta"]
