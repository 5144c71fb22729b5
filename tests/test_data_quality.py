"""Corpus cleaning at scale: the Gopher / C4 / FineWeb heuristics against hand-computed cases, language detection,
MinHash near-dedup, the same result with worker processes, and ``lmforge data`` end to end."""

import gzip
import json
import random

import pytest
from lmforge_cli import lmforge

from lmforge.data import quality
from lmforge.data.sources import FilterConfig, filter_documents, read_documents

ENGLISH = ("The old miller walked to the river with his dog, and that morning the water was high. He had to wait "
           "for the ferry, so he sat on a stone with the dog and watched the boats go by. When the ferry came, the "
           "man who ran it waved to him, and they crossed together in the cold wind of early spring.")


def test_gopher_quality_rules():
    assert quality.gopher_quality_reason("Too short to be a page.") == "gopher_few_words"
    assert quality.gopher_quality_reason(ENGLISH) is None
    assert quality.gopher_quality_reason(" ".join(["abcdefghijklm"] * 60)) == "gopher_word_length"  # mean 13 > 10
    assert quality.gopher_quality_reason(ENGLISH + " #tag" * 8) == "gopher_symbols"  # 8 '#' / 68 words > 0.1
    bullets = "\n".join(f"- item {w} of the list with the words" for w in ENGLISH.split()[:30])
    assert quality.gopher_quality_reason(bullets) == "gopher_bullets"
    ellipses = "\n".join(f"{line} and so on..." for line in ENGLISH.split(", "))
    assert quality.gopher_quality_reason(ellipses) == "gopher_ellipsis"
    numbers = " " + " ".join(str(i) for i in range(1, 21))  # 20 of 87 words have no letter: 23% > 20%
    assert quality.gopher_quality_reason(ENGLISH + numbers) == "gopher_alpha_words"
    no_stop = " ".join(w for w in ENGLISH.split() if w.lower().strip(",.") not in quality.STOP_WORDS)
    assert quality.gopher_quality_reason(no_stop + " " + no_stop) == "gopher_stop_words"


def test_repetition_fractions_by_hand():
    words = ["a", "b", "c", "d", "e", "a", "b", "c", "d", "e", "xyz"]  # 13 characters
    assert quality.duplicate_ngram_fraction(words, 5) == pytest.approx(10 / 13)  # both copies of "a b c d e"
    assert quality.duplicate_ngram_fraction(words, 6) == 0.0
    assert quality.top_ngram_fraction(words, 2) == pytest.approx(2 * 2 / 13)  # "a b" twice, 2 characters each
    assert quality.gopher_repetition_reason(ENGLISH) is None
    assert quality.gopher_repetition_reason("same line here\n" * 3 + "another\nand one more") == "gopher_dup_lines"
    spam = ENGLISH + " " + " ".join(["buy cheap shoes now"] * 12)
    assert quality.gopher_repetition_reason(spam) == "gopher_top_2gram"


def test_c4_line_filters_and_page_rules():
    page = "\n".join([ENGLISH, "Home | About | Contact", "Please enable JavaScript to view this page.",
                      "Short line.", "It was cold. The wind blew. They waited. Then they crossed. It was late."])
    cleaned, reason, removed = quality.c4_clean(page)
    assert reason is None and removed == 3  # no punctuation; javascript; fewer than 3 words
    assert "Home" not in cleaned and "JavaScript" not in cleaned and cleaned.startswith("The old miller")
    assert quality.c4_clean(page + "\nint main() { return 0; }")[1] == "c4_curly_bracket"
    assert quality.c4_clean(ENGLISH + "\nLorem ipsum dolor sit amet.")[1] == "c4_lorem_ipsum"
    assert quality.c4_clean("One sentence here. And two.")[1] == "c4_few_sentences"


def test_fineweb_rules():
    assert quality.fineweb_reason(ENGLISH) is None
    assert quality.fineweb_reason("\n".join(f"menu entry number {i} of the site" for i in range(10))) == \
        "fineweb_line_punct"
    assert quality.fineweb_reason("\n".join([ENGLISH, "Subscribe to our newsletter today.", ENGLISH])) == \
        "fineweb_dup_line_chars"
    assert quality.fineweb_reason("\n".join(["Yes.", "No.", ENGLISH, "Maybe.", "Ok."])) == "fineweb_short_lines"


def test_language_filter():
    pytest.importorskip("py3langid")
    french = ("Le vieux meunier marchait vers la rivière avec son chien, et ce matin-là l'eau était haute. Il dut "
              "attendre le bac, alors il s'assit sur une pierre et regarda passer les bateaux.")
    kept, stats = filter_documents([ENGLISH, french], FilterConfig(languages=["en"]))
    assert kept == [ENGLISH] and stats == {"kept": 1, "language": 1}
    assert quality.language_of(french)[0] == "fr"


def near_copy(text: str, rng: random.Random, edits: int = 3) -> str:
    words = text.split()
    for _ in range(edits):
        words[rng.randrange(len(words))] = rng.choice(["river", "stone", "boat", "wind"])
    return " ".join(words)


def test_near_duplicates_are_dropped_and_workers_change_nothing():
    pytest.importorskip("datasketch")
    rng = random.Random(0)
    originals = [d for d in read_documents("builtin:tinyshakespeare") if len(d.split()) >= 60][:6]
    docs = originals[:1] + [near_copy(originals[0], rng)] + originals[1:] + [near_copy(originals[3], rng, edits=2)]
    cfg = FilterConfig(near_dedup=True, minhash_threshold=0.7)
    kept, stats = filter_documents(docs, cfg)
    assert kept == originals and stats == {"kept": 6, "near_duplicate": 2}  # the first copy is the one kept
    assert filter_documents(docs, FilterConfig(near_dedup=True, minhash_threshold=0.7, workers=2)) == (kept, stats)


def test_default_filters_drop_nothing_new_from_the_tiny_recipe():
    """The tiny recipe's sources under the default filters: only exact duplicates go, as before."""
    for source, expected in (("builtin:tinyshakespeare", {"kept": 7148, "duplicate": 74}),
                             ("builtin:tinyworld/quiz", {"kept": 3000})):
        assert filter_documents(read_documents(source), FilterConfig())[1] == expected


def test_cli_data_cleans_tokenizes_and_reports(tmp_path, tiny_model_dir):
    corpus = tmp_path / "corpus.jsonl"
    rows = [ENGLISH, ENGLISH, near_copy(ENGLISH, random.Random(1), 2), "Too short.", "menu\nhome\nlogin\n" * 30]
    rows += [f"{ENGLISH} Told again, the {i}th time, by the {w} at the inn." for i, w in
             enumerate(["cook", "guard", "nurse", "clerk"]) for _ in range(1)]
    corpus.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    tok = tiny_model_dir("data_tok")
    out = tmp_path / "out"
    args = ("data", f"source={corpus}", f"out_dir={out}", f"tokenizer={tok}", "filters.gopher_quality=true",
            "filters.gopher_repetition=true", "filters.near_dedup=true", "filters.minhash_threshold=0.7",
            "val_fraction=0.3")
    assert "near_duplicate" in lmforge(*args).stdout
    report = json.loads((out / "data_report.json").read_text())
    assert report["documents_in"] == 9
    drops = {k: v["documents"] for k, v in report["drops"].items()}
    assert drops["duplicate"] == 1 and drops["gopher_few_words"] >= 1 and drops["near_duplicate"] >= 1
    assert report["documents_kept"] + sum(drops.values()) == 9
    with gzip.open(out / "clean" / "part_00000.jsonl.gz", "rt") as f:
        kept = [json.loads(line)["text"] for line in f]
    assert len(kept) == report["documents_kept"] and kept[0] == ENGLISH
    meta = json.loads((out / "tokens" / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == report["tokens_train"] + report["tokens_val"] > 0
    assert sum(report["length_histogram"]["counts"]) == report["documents_kept"]
    assert (out / "data_report.md").exists() and (out / "length_histogram.png").exists()
    assert "unchanged: skipped" in lmforge(*args).stdout
    assert list(read_documents(str(out / "clean"))) == kept  # pretrain data.source=OUT/clean reads it back


def test_bad_filter_config_is_one_clear_error(tmp_path):
    proc = lmforge("data", "source=x.txt", "filters.minhash_threshold=0", check=False)
    assert proc.returncode == 2 and "minhash_threshold must be in (0, 1]" in proc.stderr
