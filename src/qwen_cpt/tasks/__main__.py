"""``python -m qwen_cpt.tasks``: rebuild the shipped data from this machine's held-out
documents (the corpus readers live in qwen_cpt.demo, which imports this package)."""

from ..demo import code_corpus, general_corpus
from . import write_tasks

print(write_tasks(code_corpus(), general_corpus()))
