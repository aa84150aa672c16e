"""tools/tiny_components.py: complete, deterministic tiny checkpoints."""

import hashlib

from tools.tiny_components import learn_bpe, write_tiny_components


def _digest(root):
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_tiny_components_are_deterministic(tmp_path, tiny_components):
    from pathlib import Path

    again = write_tiny_components(tmp_path / "again", seed=0)
    first, second = _digest(Path(tiny_components["vision"]).parent), _digest(Path(again["vision"]).parent)
    assert first.keys() == second.keys() and "clip/tokenizer.json" in first and "decoder/model.safetensors" in first
    assert first == second
    other = write_tiny_components(tmp_path / "other", seed=1)
    assert _digest(Path(other["vision"]).parent)["decoder/model.safetensors"] != first["decoder/model.safetensors"]


def test_learn_bpe_breaks_ties_deterministically():
    from collections import Counter

    words = Counter({"cd": 3, "ab": 3, "abx": 1})
    merges = learn_bpe(words, 2, suffix="</w>")
    # ("c", "d</w>") occurs 3 times, ("a", "b") 1 time, ("a", "b</w>") 3 times: the two tied pairs come in pair order,
    # whatever the order of the words
    assert merges == [("a", "b</w>"), ("c", "d</w>")]
    assert learn_bpe(Counter(dict(reversed(list(words.items())))), 2, suffix="</w>") == merges
