"""The seeded workload every benchmark shares.

A workload is a list of chat requests, each already rendered to prompt token ids
through the model's chat template, with the number of tokens to generate and an
arrival offset. The same spec and seed give the same requests, token for token, on
any machine with the same tokenizer.

- User messages are English text built from a small grammar of sentence frames and
  word pools (no downloads): a short passage followed by an instruction about it,
  or a standalone question when the length budget is small. Their length in tokens
  is drawn log-uniformly between ``prompt_tokens`` bounds (20-400 by default); the
  chat template adds its own ~30 tokens (system prompt and role markers).
- Output lengths are uniform integers between ``output_tokens`` bounds (16-128).
  Benchmarks run with EOS ignored, so every system produces exactly that many.
- Arrival: ``"burst"`` (all at offset 0) or ``"poisson"`` at ``rate`` requests/s
  (exponential gaps; the first request arrives at 0).
- ``repeat_fraction`` of the requests are exact copies of an earlier request, and
  ``paraphrase_fraction`` are rewordings of an earlier one (same passage and
  instruction, said with other words and sentence orders), for cache benchmarks.

Each request draws from its own random stream (seed and index), so the first 16
requests of a 64-request workload are the 16-request workload, and
``prompt_scale=4`` gives the same requests with passages four times as long.

Example::

    from benchmarks.workload import WorkloadSpec, build_workload, load_tokenizer

    wl = build_workload(WorkloadSpec(num_requests=64, seed=0), load_tokenizer())
    wl.requests[0].prompt_token_ids, wl.requests[0].max_tokens
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m"

# --------------------------------------------------------------------------- text
# Every pool entry is a pair: (original wording, paraphrase wording).
_CONNECTIVES = [
    ("", ""),
    ("", ""),
    ("Meanwhile, ", "At the same time, "),
    ("Later, ", "Afterwards, "),
    ("As a result, ", "Consequently, "),
    ("Surprisingly, ", "To everyone's surprise, "),
    ("In the end, ", "Eventually, "),
    ("Two weeks later, ", "A fortnight later, "),
    ("By contrast, ", "On the other hand, "),
    ("At first, ", "Initially, "),
]
_SUBJECTS = [
    ("the city council", "the town council"),
    ("a team of marine biologists", "a group of ocean scientists"),
    ("the old lighthouse keeper", "the elderly keeper of the lighthouse"),
    ("the software engineers", "the programmers"),
    ("my grandmother", "my grandma"),
    ("the museum curator", "the curator of the museum"),
    ("the owner of a small bakery", "a little bakery's owner"),
    ("the school board", "the board of the school"),
    ("the research laboratory", "the research lab"),
    ("the farmers in the valley", "the valley's farmers"),
    ("a retired train driver", "a former locomotive driver"),
    ("the volunteer firefighters", "the unpaid fire crew"),
    ("the village choir", "the choir of the village"),
    ("two university students", "a pair of college students"),
    ("the harbour master", "the master of the harbour"),
    ("the local newspaper", "the town's paper"),
    ("a young architect", "an architect early in her career"),
    ("the night-shift nurses", "the nurses on the night shift"),
    ("the chess club", "the members of the chess club"),
    ("an amateur astronomer", "a hobbyist stargazer"),
    ("the beekeepers' association", "the association of beekeepers"),
    ("the bus company", "the company running the buses"),
    ("a travelling musician", "a wandering musician"),
    ("the park rangers", "the rangers of the national park"),
]
_VERBS = [
    ("decided to rebuild", "chose to reconstruct"),
    ("spent months studying", "devoted months to studying"),
    ("quietly repaired", "discreetly fixed"),
    ("wrote a long report about", "published a detailed report on"),
    ("argued for years about", "debated for years over"),
    ("carefully measured", "precisely measured"),
    ("raised money to protect", "collected funds to preserve"),
    ("took photographs of", "photographed"),
    ("complained loudly about", "protested noisily against"),
    ("discovered a problem with", "found a fault in"),
    ("proposed a plan to modernise", "suggested a scheme to update"),
    ("painted a mural of", "made a wall painting of"),
    ("organised a public tour of", "arranged an open tour of"),
    ("drew detailed maps of", "sketched precise maps of"),
    ("held a long meeting about", "met at length to discuss"),
    ("tested a cheaper way to clean", "tried a less costly way of cleaning"),
    ("started a weekly class about", "began running a weekly course on"),
    ("made a short film about", "produced a brief documentary on"),
    ("kept a careful watch over", "closely monitored"),
    ("borrowed old records about", "loaned historical documents on"),
]
_OBJECTS = [
    ("the harbour bridge", "the bridge across the harbour"),
    ("an unusual migration of whales", "a strange whale migration"),
    ("the ancient water mill", "the old water mill"),
    ("a new scheduling system", "a new system for planning shifts"),
    ("the flooded railway tunnel", "the railway tunnel that had flooded"),
    ("the orchard behind the church", "the fruit trees behind the church"),
    ("the broken clock tower", "the damaged clock tower"),
    ("a colony of rare orchids", "a group of uncommon orchids"),
    ("the public library's roof", "the roof of the public library"),
    ("the river's changing course", "the shifting path of the river"),
    ("the last wooden fishing boat", "the final timber fishing vessel"),
    ("the night market", "the evening market"),
    ("the solar panels on the school", "the school's solar panels"),
    ("the abandoned observatory", "the deserted observatory"),
    ("a collection of old maps", "a set of historic maps"),
    ("the mountain footpath", "the trail up the mountain"),
    ("the town's drinking water", "the water supply of the town"),
    ("the winter bird count", "the yearly winter survey of birds"),
    ("the hospital's heating system", "the heating in the hospital"),
    ("the crumbling sea wall", "the decaying sea wall"),
    ("a forgotten family recipe", "an old recipe the family had lost"),
    ("the neighbourhood's street lights", "the lamps along the local streets"),
    ("the coral reef near the island", "the reef of coral by the island"),
    ("the traffic at the main crossing", "the cars at the central junction"),
    ("the old printing press", "the antique press"),
    ("a swarm of honeybees", "a cloud of bees"),
    ("the community garden", "the shared garden"),
    ("the empty factory by the canal", "the disused factory near the canal"),
]
_TIMES = [
    ("last spring", "in the spring of last year"),
    ("before the festival", "ahead of the festival"),
    ("during the long dry summer", "throughout the long summer drought"),
    ("early one foggy morning", "on a misty morning"),
    ("over the winter holidays", "across the winter break"),
    ("in the autumn", "when autumn came"),
    ("after the election", "once the election was over"),
    ("within a single week", "in just seven days"),
    ("late at night", "in the late hours of the night"),
    ("at the start of the year", "as the year began"),
    ("during the storm season", "in the season of storms"),
    ("on a quiet Sunday", "one calm Sunday"),
    ("for almost a decade", "for nearly ten years"),
    ("just before sunrise", "shortly before dawn"),
]
_REASONS = [
    ("because the winter storms had been severe", "since the winter storms were harsh"),
    ("after a long and careful survey", "following a lengthy, careful survey"),
    ("hoping to attract more visitors", "in the hope of drawing more tourists"),
    ("although the budget was very tight", "even though money was short"),
    ("as the neighbours had asked them to", "because the neighbours requested it"),
    ("to keep a promise made years earlier", "to honour an old promise"),
    ("since nobody else seemed interested", "as no one else cared much"),
    (
        "because the old methods were failing",
        "as the traditional ways no longer worked",
    ),
    ("so that children could learn from it", "so children might learn something"),
    ("despite warnings from the experts", "in spite of the specialists' warnings"),
    ("once the permits finally arrived", "when the permissions at last came through"),
    ("to settle a long-running dispute", "to end a quarrel that had lasted years"),
    ("after a visitor raised the alarm", "when a guest sounded the alarm"),
    ("because the insurance demanded it", "as the insurer required it"),
    ("without telling anyone in advance", "with no warning to anybody"),
    ("while the weather stayed calm", "as long as the weather was mild"),
]
_ADJECTIVES = [
    ("noisy", "loud"),
    ("fragile", "delicate"),
    ("expensive", "costly"),
    ("beautiful", "lovely"),
    ("neglected", "uncared for"),
    ("surprisingly modern", "unexpectedly up to date"),
    ("dangerous", "hazardous"),
    ("crowded", "packed with people"),
    ("quiet", "peaceful"),
    ("enormous", "huge"),
    ("old-fashioned", "out of date"),
    ("well organised", "orderly"),
    ("popular", "well liked"),
    ("damp", "humid"),
    ("colourful", "brightly coloured"),
    ("hard to reach", "difficult to get to"),
    ("badly lit", "poorly lit"),
    ("carefully restored", "painstakingly renovated"),
    ("famous", "well known"),
    ("strangely empty", "oddly deserted"),
]
_WITNESSES = [
    ("a local teacher", "a teacher from the area"),
    ("the mayor", "the town's mayor"),
    ("several visitors", "a number of tourists"),
    ("an engineer who inspected it", "an engineer who examined it"),
    ("the people living nearby", "the nearby residents"),
    ("an old guidebook", "a dated travel guide"),
    ("the official report", "the formal report"),
    ("a shopkeeper across the street", "a merchant on the opposite side of the road"),
    ("a historian", "a scholar of local history"),
    ("the children who visited", "the visiting schoolchildren"),
    ("a retired sailor", "a former seaman"),
    ("most of the staff", "the majority of the employees"),
]
_PLACES = [
    ("near the old market square", "close to the former market square"),
    ("on the edge of town", "at the outskirts of the town"),
    ("along the northern coast", "on the northern shoreline"),
    ("in the hills above the village", "up in the hills over the village"),
    ("beside the railway station", "next to the train station"),
    ("across the river", "on the far bank of the river"),
    ("at the end of a narrow lane", "where a narrow lane ends"),
    ("behind the town hall", "at the back of the town hall"),
    ("in the basement of the library", "below the library"),
    ("on a small island", "on a little island"),
    ("in the middle of the forest", "deep in the woods"),
    ("close to the harbour", "near the port"),
    ("next to the primary school", "beside the elementary school"),
    ("in the old industrial quarter", "in the former factory district"),
]
_CHANGES = [
    ("fall apart", "crumble"),
    ("become popular", "catch on"),
    ("disappear", "vanish"),
    ("recover", "bounce back"),
    ("change", "transform"),
    ("grow", "expand"),
    ("fill with people", "get crowded"),
    ("be forgotten", "slip from memory"),
    ("turn into a landmark", "become a local landmark"),
    ("need repairs again", "require fixing once more"),
]

# Sentence frames: (original template, paraphrase template).
_FRAMES = [
    (
        "{conn}{subj} {verb} {obj} {time}, {reason}.",
        "{conn}{time}, {subj} {verb} {obj}, {reason}.",
    ),
    (
        "{obj} seemed {adj} and {adj2}, according to {witness}.",
        "According to {witness}, {obj} looked {adj} and {adj2}.",
    ),
    (
        "{conn}{subj} {verb} {obj} {place}.",
        "{conn}{place}, {subj} {verb} {obj}.",
    ),
    (
        "Nobody expected {obj} to {change} so quickly.",
        "Few people thought {obj} would {change} that fast.",
    ),
    (
        "{conn}{witness} noticed that {obj} {place} looked {adj}.",
        "{conn}{obj} {place} seemed {adj} to {witness}.",
    ),
    (
        "{subj} {verb} {obj} {reason}.",
        "{reason_cap}, {subj} {verb} {obj}.",
    ),
]

_INSTRUCTIONS = [
    (
        "Summarize the passage above in two sentences.",
        "Give a two-sentence summary of the text above.",
    ),
    (
        "What is the main point of this text?",
        "What is this text mainly about?",
    ),
    (
        "List three questions a curious reader might ask after reading this.",
        "Write three questions that a curious reader could ask after this text.",
    ),
    (
        "Rewrite the passage in simple words for a ten-year-old.",
        "Explain the passage in plain language a ten-year-old would understand.",
    ),
    (
        "Suggest a short title for this story.",
        "Propose a brief headline for this story.",
    ),
    (
        "Continue the story with one more paragraph.",
        "Add another paragraph that carries the story on.",
    ),
    (
        "Which people are mentioned in the text, and what did each of them do?",
        "Who appears in this text and what does each person do?",
    ),
    (
        "Is the tone of this passage hopeful or worried? Explain briefly.",
        "Does this passage sound optimistic or anxious? Give a short reason.",
    ),
    (
        "Turn the passage into a bulleted list of facts.",
        "Convert the text into a list of facts with bullet points.",
    ),
    (
        "Write a polite letter to the town about the events described.",
        "Draft a courteous letter to the town concerning what happened above.",
    ),
    (
        "What could go wrong next? Give two possibilities.",
        "Name two things that might go badly next.",
    ),
    (
        "Translate the first sentence into French.",
        "Give the French translation of the opening sentence.",
    ),
]

_QUESTIONS = [
    (
        "What is the boiling point of water at sea level?",
        "At sea level, at what temperature does water boil?",
    ),
    ("Why is the sky blue?", "What makes the sky look blue?"),
    ("Name three primary colours.", "List the three primary colours."),
    (
        "How many legs does a spider have?",
        "What is the number of legs on a spider?",
    ),
    (
        "Write a haiku about autumn leaves.",
        "Compose a haiku on the leaves of autumn.",
    ),
    (
        "Explain recursion to a child in one sentence.",
        "In one sentence, describe recursion for a child.",
    ),
    ("What is the capital of Japan?", "Which city is Japan's capital?"),
    (
        "Give me a tip for sleeping better.",
        "Share one piece of advice for better sleep.",
    ),
    (
        "How do plants make their food?",
        "By what process do plants produce their food?",
    ),
    (
        "Suggest a name for a grey kitten.",
        "What would be a good name for a grey kitten?",
    ),
    (
        "What is the difference between weather and climate?",
        "How does climate differ from weather?",
    ),
    (
        "Write one sentence about the ocean at night.",
        "Describe the sea at night in a single sentence.",
    ),
    (
        "Why do cats purr?",
        "What is the reason cats purr?",
    ),
    (
        "How far is the Moon from the Earth?",
        "What is the distance between the Earth and the Moon?",
    ),
    (
        "Give an example of a prime number larger than fifty.",
        "Name a prime number greater than 50.",
    ),
    (
        "What should I pack for a day of hiking?",
        "What do I need to bring on a day hike?",
    ),
]


@dataclass(frozen=True, slots=True)
class _TextSpec:
    """What a user message says, independent of the wording."""

    sentences: tuple[tuple[int, tuple[int, ...]], ...]
    """(frame index, slot choices) for each sentence of the passage."""
    ask: tuple[str, int]
    """("instruction" | "question", index)."""


_SLOT_POOLS = {
    "conn": _CONNECTIVES,
    "subj": _SUBJECTS,
    "verb": _VERBS,
    "obj": _OBJECTS,
    "time": _TIMES,
    "reason": _REASONS,
    "adj": _ADJECTIVES,
    "adj2": _ADJECTIVES,
    "witness": _WITNESSES,
    "place": _PLACES,
    "change": _CHANGES,
}
_SLOT_ORDER = tuple(_SLOT_POOLS)


def _draw_sentence(
    rng: random.Random, used: dict[str, set[int]]
) -> tuple[int, tuple[int, ...]]:
    """One sentence; within a passage each pool entry is used once before any
    entry repeats (``used`` tracks what this passage has taken)."""
    frame = rng.randrange(len(_FRAMES))
    choices = []
    for name in _SLOT_ORDER:
        size = len(_SLOT_POOLS[name])
        taken = used.setdefault(name, set())
        if len(taken) >= size:
            taken.clear()
        free = [i for i in range(size) if i not in taken]
        pick = free[rng.randrange(len(free))]
        taken.add(pick)
        choices.append(pick)
    return frame, tuple(choices)


def _render_sentence(sentence: tuple[int, tuple[int, ...]], variant: int) -> str:
    frame, choices = sentence
    values = {
        name: _SLOT_POOLS[name][i][variant] for name, i in zip(_SLOT_ORDER, choices)
    }
    if values["adj2"] == values["adj"]:
        values["adj2"] = _ADJECTIVES[(choices[7] + 1) % len(_ADJECTIVES)][variant]
    values["reason_cap"] = _capitalize(values["reason"])
    return _capitalize(_FRAMES[frame][variant].format(**values))


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _render_text(spec: _TextSpec, variant: int) -> str:
    kind, idx = spec.ask
    pool = _INSTRUCTIONS if kind == "instruction" else _QUESTIONS
    ask = pool[idx][variant]
    body = [_render_sentence(s, variant) for s in spec.sentences]
    if not body:
        return ask
    # Paragraphs of four sentences read more like real text than one long line.
    paras = [" ".join(body[i : i + 4]) for i in range(0, len(body), 4)]
    return "\n\n".join(paras) + "\n\n" + ask


def _draw_text(rng: random.Random, target_tokens: int, count: Any) -> _TextSpec:
    """A passage plus an instruction whose token count comes close to
    ``target_tokens`` (never above it by more than the shortest ask).

    ``count(text)`` returns the number of tokens of a piece of text.
    """
    instruction = rng.randrange(len(_INSTRUCTIONS))
    question = rng.randrange(len(_QUESTIONS))
    ask_len = count(_INSTRUCTIONS[instruction][0]) + 2
    sentences: list[tuple[int, tuple[int, ...]]] = []
    used = ask_len
    taken: dict[str, set[int]] = {}
    while True:
        s = _draw_sentence(rng, taken)
        n = count(_render_sentence(s, 0)) + 1
        if used + n > target_tokens:
            break
        sentences.append(s)
        used += n
    if not sentences:
        return _TextSpec((), ("question", question))
    return _TextSpec(tuple(sentences), ("instruction", instruction))


# ----------------------------------------------------------------------- requests
@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """How to build a workload. Every field has the benchmark's default."""

    num_requests: int = 64
    seed: int = 0
    prompt_tokens: tuple[int, int] = (20, 400)
    """Bounds of the user message length in tokens (log-uniform), before the chat
    template adds its own tokens."""
    output_tokens: tuple[int, int] = (16, 128)
    """Bounds of the tokens to generate (uniform)."""
    prompt_scale: float = 1.0
    """Multiplies the drawn message lengths (4.0 = the 4x-longer-prompts curve)."""
    arrival: str = "burst"
    """"burst" (all at 0) or "poisson"."""
    rate: float | None = None
    """Requests per second for Poisson arrivals."""
    repeat_fraction: float = 0.0
    """Share of requests that are exact copies of an earlier one."""
    paraphrase_fraction: float = 0.0
    """Share of requests that reword an earlier one."""

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests={self.num_requests} must be >= 1")
        lo, hi = self.prompt_tokens
        if not 1 <= lo <= hi:
            raise ValueError(
                f"prompt_tokens={self.prompt_tokens} must be 1 <= lo <= hi"
            )
        lo, hi = self.output_tokens
        if not 1 <= lo <= hi:
            raise ValueError(
                f"output_tokens={self.output_tokens} must be 1 <= lo <= hi"
            )
        if self.prompt_scale <= 0:
            raise ValueError(f"prompt_scale={self.prompt_scale} must be > 0")
        if self.arrival not in ("burst", "poisson"):
            raise ValueError(f"arrival={self.arrival!r}: use 'burst' or 'poisson'")
        if self.arrival == "poisson" and not (self.rate and self.rate > 0):
            raise ValueError("poisson arrival needs rate > 0 (requests per second)")
        for name in ("repeat_fraction", "paraphrase_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")
        if self.repeat_fraction + self.paraphrase_fraction >= 1.0:
            raise ValueError("repeat_fraction + paraphrase_fraction must be < 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompt_tokens"] = list(self.prompt_tokens)
        d["output_tokens"] = list(self.output_tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkloadSpec:
        d = dict(d)
        d["prompt_tokens"] = tuple(d["prompt_tokens"])
        d["output_tokens"] = tuple(d["output_tokens"])
        return cls(**d)


@dataclass(slots=True)
class BenchRequest:
    """One request of a workload."""

    index: int
    prompt_token_ids: list[int]
    max_tokens: int
    arrival_s: float
    """Offset from the start of the run at which the request is submitted."""
    messages: list[dict[str, str]]
    kind: str = "unique"
    """"unique", "repeat" (exact copy of ``source``) or "paraphrase" (of ``source``)."""
    source: int | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchRequest:
        return cls(**d)


@dataclass(slots=True)
class Workload:
    spec: WorkloadSpec
    requests: list[BenchRequest] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.num_prompt_tokens for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    def summary(self) -> dict[str, Any]:
        plens = sorted(r.num_prompt_tokens for r in self.requests)
        kinds: dict[str, int] = {}
        for r in self.requests:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        return {
            "spec": self.spec.to_dict(),
            "num_requests": len(self.requests),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "prompt_len_min": plens[0],
            "prompt_len_median": plens[len(plens) // 2],
            "prompt_len_max": plens[-1],
            "kinds": kinds,
            "last_arrival_s": max(r.arrival_s for r in self.requests),
        }

    def to_json(self, path: str | Path) -> None:
        data = {
            "spec": self.spec.to_dict(),
            "requests": [r.to_dict() for r in self.requests],
        }
        Path(path).write_text(json.dumps(data))

    @classmethod
    def from_json(cls, path: str | Path) -> Workload:
        data = json.loads(Path(path).read_text())
        return cls(
            WorkloadSpec.from_dict(data["spec"]),
            [BenchRequest.from_dict(r) for r in data["requests"]],
        )


def load_tokenizer(model: str = DEFAULT_MODEL) -> Any:
    """The tokenizer of a registered llmprod model name or a transformers folder
    (no weights are loaded)."""
    from transformers import AutoTokenizer

    from llmprod.models.registry import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


def chat_token_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Render a conversation the way ``Engine.render_chat`` does."""
    text = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def _kinds(spec: WorkloadSpec) -> list[str]:
    n = spec.num_requests
    n_rep = round(n * spec.repeat_fraction)
    n_para = round(n * spec.paraphrase_fraction)
    n_rep, n_para = min(n_rep, n - 1), min(n_para, max(n - 1 - n_rep, 0))
    kinds = ["unique"] * n
    # The first request is always unique, so every copy has something to copy.
    slots = random.Random(f"{spec.seed}:kinds").sample(range(1, n), n_rep + n_para)
    for i in slots[:n_rep]:
        kinds[i] = "repeat"
    for i in slots[n_rep:]:
        kinds[i] = "paraphrase"
    return kinds


def _arrivals(spec: WorkloadSpec) -> list[float]:
    if spec.arrival == "burst":
        return [0.0] * spec.num_requests
    assert spec.rate is not None
    rng = random.Random(f"{spec.seed}:arrival")
    t, out = 0.0, []
    for _ in range(spec.num_requests):
        out.append(t)
        t += rng.expovariate(spec.rate)
    return out


def build_workload(spec: WorkloadSpec, tokenizer: Any) -> Workload:
    """Build the requests of ``spec`` (deterministic for a given tokenizer)."""
    cache: dict[str, int] = {}

    def count(text: str) -> int:
        n = cache.get(text)
        if n is None:
            n = cache[text] = len(tokenizer.encode(text, add_special_tokens=False))
        return n

    lo, hi = spec.prompt_tokens
    out_lo, out_hi = spec.output_tokens
    kinds = _kinds(spec)
    arrivals = _arrivals(spec)
    text_specs: dict[int, _TextSpec] = {}
    requests: list[BenchRequest] = []
    uniques: list[int] = []
    for i in range(spec.num_requests):
        lengths = random.Random(f"{spec.seed}:{i}:lengths")
        u = lengths.random()
        target = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        target = max(1, round(target * spec.prompt_scale))
        max_tokens = lengths.randint(out_lo, out_hi)
        kind, source = kinds[i], None
        if kind == "unique":
            ts = _draw_text(random.Random(f"{spec.seed}:{i}:text"), target, count)
            text_specs[i] = ts
            content = _render_text(ts, 0)
            uniques.append(i)
        else:
            source = random.Random(f"{spec.seed}:{i}:source").choice(uniques)
            max_tokens = requests[source].max_tokens
            if kind == "repeat":
                content = requests[source].messages[-1]["content"]
            else:
                content = _render_text(text_specs[source], 1)
        messages = [{"role": "user", "content": content}]
        requests.append(
            BenchRequest(
                index=i,
                prompt_token_ids=chat_token_ids(tokenizer, messages),
                max_tokens=max_tokens,
                arrival_s=arrivals[i],
                messages=messages,
                kind=kind,
                source=source,
            )
        )
    return Workload(spec, requests)


def warmup_spec(spec: WorkloadSpec, num_requests: int = 4) -> WorkloadSpec:
    """A small workload for warming a system up: other text (another seed), short
    outputs, all at once, no copies."""
    return replace(
        spec,
        num_requests=num_requests,
        seed=spec.seed + 10_000,
        output_tokens=(4, 8),
        prompt_scale=1.0,
        arrival="burst",
        rate=None,
        repeat_fraction=0.0,
        paraphrase_fraction=0.0,
    )
