"""Regenerate gridlab's own task, src/gridlab/tasks/stdlib_identifiers.jsonl: "complete the module attribute".

    python scripts/make_stdlib_identifiers.py [--items 300] [--seed 0] [--out PATH] [--tokenizers DIR ...]
                                              [--check-tokenizer DIR ...]

Every item is a place in held-out text: a line of a standard-library file that the default corpus and split
fractions (gridlab.data.DEFAULT_FRACTIONS) send to the validation split, where a module the file imports is used as
``module.attribute``. The context is the line up to ``module.`` (after the previous non-blank line when both fit in
160 characters, each without its indent; no two items share a context); the answer is the attribute the file uses
there. The three other choices are attributes the corpus uses on other modules but never on this one (real
identifiers that do not fit there), each used at least 5 times, so none is a misspelling or a rarity.

Length is no clue. For each item the answer's rank by characters among its four choices is drawn uniformly and the
distractors are picked so that exactly that many are shorter than the answer (the rest longer, no ties), all with
the answer's token count under reference tokenizers (default: gridlab BPEs of 1,024 and 4,096 tokens trained on the
default corpus, ~40 s) and about its frequency in the corpus (so other tokenizers, which give frequent words fewer
tokens, see no difference either). Guessing the shortest choice is right in about a quarter of the items, the chance
level — by characters and by tokens (--check-tokenizer prints it per tokenizer; tests/test_evaluate.py checks it).

Items are spread over the validation documents (at most --per-document from one file) and drawn with a seeded
generator; each records its file (``doc``, relative to the standard library) and 1-based ``line``. A new data file
changes the task's content fingerprint, so `gridlab plan` gives the evaluations that run it new ids.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from gridlab.data import DEFAULT_FRACTIONS, CorpusSource, assign_split, iter_documents  # noqa: E402
from gridlab.tasks import TASKS_DIR  # noqa: E402

IMPORT = re.compile(r"^\s*import\s+([A-Za-z_][\w.]*(?:\s+as\s+\w+)?(?:\s*,\s*[A-Za-z_][\w.]*(?:\s+as\s+\w+)?)*)\s*$")
WORD = re.compile(r"[A-Za-z_]\w*")
USE = re.compile(r"(?<![\w.])([A-Za-z_]\w*)\.([A-Za-z_]\w*)\b")
MIN_ANSWER, MAX_ANSWER = 4, 18        # answer lengths with room for shorter and longer distractors
MIN_USES = 5                          # a distractor is used at least this often in the corpus
CONTEXT_CHARS = 160


def imported_modules(text: str) -> set[str]:
    """The names a file binds with top-level ``import a``, ``import a.b`` (binds a) and ``import a as b``."""
    names = set()
    for line in text.splitlines():
        match = IMPORT.match(line)
        if not match:
            continue
        for part in match.group(1).split(","):
            words = part.split()
            names.add(words[-1] if len(words) == 3 else words[0].split(".")[0])
    return names


def module_uses(text: str) -> list[tuple[int, int, str, str]]:
    """(line index, column of the attribute, module, attribute) of every ``module.attribute`` on an imported module
    outside comments and docstring-looking lines."""
    modules = imported_modules(text)
    uses = []
    for number, line in enumerate(text.splitlines()):
        stripped = line.lstrip()
        if not stripped or stripped.startswith(("#", "import ", "from ", '"', "'")):
            continue
        code = line.split("#", 1)[0]
        for match in USE.finditer(code):
            if match.group(1) in modules:
                uses.append((number, match.start(2), match.group(1), match.group(2)))
    return uses


def context_of(lines: list[str], number: int, column: int) -> str:
    """The line up to the attribute, after the previous non-blank line when both fit (each without its indent)."""
    current = lines[number][:column].lstrip()
    previous = next((lines[i].strip() for i in range(number - 1, max(-1, number - 4), -1) if lines[i].strip()), None)
    if previous is not None and len(previous) + 1 + len(current) <= CONTEXT_CHARS:
        return previous + "\n" + current
    return current


def pick_distractors(answer: str, rank: int, pool: dict[tuple[int, int], list[str]], tokens, counts: Counter,
                     excluded: set[str], rng) -> list[str] | None:
    """Three identifiers of the answer's token counts (``tokens``: under the reference tokenizers), ``rank`` of them
    shorter in characters than ``answer`` and 3 − rank longer (no ties), drawn among the closest lengths that still
    leave a choice and, at a length, among the three used about as often as the answer (so that other tokenizers,
    which give frequent words fewer tokens, see no difference either). None when the pool has too few."""
    count, picked = tokens(answer), []
    for wanted, direction in ((rank, -1), (3 - rank, +1)):
        length, chosen = len(answer) + direction, []
        while len(chosen) < wanted and 1 <= length <= MAX_ANSWER + 8:
            options = [word for word in pool.get((count, length), []) if word not in excluded and word not in chosen]
            if options:
                options.sort(key=lambda word: abs(np.log(counts[word] / counts[answer])))
                chosen.append(options[int(rng.integers(min(3, len(options))))])
                if rng.random() < 0.5:  # sometimes the next one comes from the next length out
                    length += direction
            else:
                length += direction
        if len(chosen) < wanted:
            return None
        picked.extend(chosen)
    return picked


def reference_tokenizers(folders: list[Path]):
    """The token counts the choices are matched on: a word's count under each tokenizer of ``folders``, or by
    default under gridlab BPEs of 1,024 (the default study's, as `gridlab submit grid.toml` trains it) and 4,096
    tokens trained on the default corpus's pretrain split."""
    import tempfile

    from gridlab.data import load_tokenizer, train_tokenizer

    if not folders:
        root = Path(tempfile.mkdtemp(prefix="stdlib-bpe-"))
        folders = [train_tokenizer(CorpusSource(kind="stdlib"), DEFAULT_FRACTIONS, size, root / str(size))
                   for size in (1024, 4096)]
    tokenizers = [load_tokenizer(folder) for folder in folders]
    return lambda word: tuple(len(t(word, add_special_tokens=False)["input_ids"]) for t in tokenizers)


def generate(items: int, seed: int, per_document: int, tokens) -> list[dict]:
    source = CorpusSource(kind="stdlib")
    uses_of: dict[str, list] = {}
    texts: dict[str, str] = {}
    attributes_of: dict[str, set[str]] = defaultdict(set)   # module -> attributes used on it anywhere
    counts: Counter[str] = Counter()                        # attribute -> uses on any module, anywhere
    words: Counter[str] = Counter()                         # identifier -> occurrences in the corpus's text
    for key, text in iter_documents(source):
        uses = module_uses(text)
        words.update(WORD.findall(text))
        for _, _, module, attribute in uses:
            attributes_of[module].add(attribute)
            counts[attribute] += 1
        if assign_split(key, DEFAULT_FRACTIONS) == "validation":
            uses_of[key], texts[key] = uses, text
    pool: dict[tuple[int, int], list[str]] = defaultdict(list)
    for word, count in sorted(counts.items()):
        if count >= MIN_USES and not word.startswith("_"):
            pool[tokens(word), len(word)].append(word)

    rng = np.random.default_rng(seed)
    candidates = []
    for key in sorted(uses_of):
        lines = texts[key].splitlines()
        seen = set()
        sites = [use for use in uses_of[key] if MIN_ANSWER <= len(use[3]) <= MAX_ANSWER
                 and not use[3].startswith("_") and (use[2], use[3]) not in seen and not seen.add((use[2], use[3]))]
        for index in rng.permutation(len(sites))[:per_document]:
            candidates.append((key, lines, *sites[index]))
    out, contexts = [], set()
    for index in rng.permutation(len(candidates)):
        key, lines, number, column, module, answer = candidates[index]
        context = context_of(lines, number, column)
        if context in contexts:
            continue
        rank = int(rng.integers(4))
        distractors = pick_distractors(answer, rank, pool, tokens, words, attributes_of[module] | {answer},
                                       rng)
        if distractors is None:
            continue
        choices = [answer, *distractors]
        order = rng.permutation(4)
        choices = [choices[i] for i in order]
        contexts.add(context)
        out.append({"context": context, "choices": choices,
                    "label": int(np.flatnonzero(order == 0)[0]), "doc": key, "line": number + 1})
        if len(out) == items:
            break
    return out


def shortest_share(items: list[dict], length) -> float:
    """How often a guess of the shortest choice (a random one among those tied for shortest) is right: 1/4 when
    length says nothing about the answer."""
    shares = []
    for item in items:
        lengths = [length(choice) for choice in item["choices"]]
        shortest = [i for i, value in enumerate(lengths) if value == min(lengths)]
        shares.append(1 / len(shortest) if item["label"] in shortest else 0.0)
    return float(np.mean(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-document", type=int, default=6)
    parser.add_argument("--out", type=Path, default=TASKS_DIR / "stdlib_identifiers.jsonl")
    parser.add_argument("--tokenizers", type=Path, nargs="*", default=[],
                        help="match token counts on these tokenizers (default: gridlab BPEs of 1,024 and 4,096)")
    parser.add_argument("--check-tokenizer", nargs="*", default=[], help="tokenizer folders to report token shares")
    args = parser.parse_args()
    items = generate(args.items, args.seed, args.per_document, reference_tokenizers(args.tokenizers))
    args.out.write_text("".join(json.dumps(item) + "\n" for item in items))
    print(f"{len(items)} items from {len({item['doc'] for item in items})} validation documents → {args.out}")
    print(f"answer is the shortest choice: by characters {shortest_share(items, len):.3f}")
    for folder in args.check_tokenizer:
        from gridlab.data import load_tokenizer

        tokenizer = load_tokenizer(folder)
        share = shortest_share(items, lambda word, t=tokenizer: len(t(word, add_special_tokens=False)["input_ids"]))
        print(f"  by tokens of {folder}: {share:.3f}")


if __name__ == "__main__":
    main()
