"""Varied prompts for the correctness tests (1 to ~1000 tokens)."""

from __future__ import annotations

PARAGRAPH = (
    "The history of computing is a story of layers. Early machines were programmed "
    "by rewiring panels; stored programs replaced the wires with memory, and "
    "assemblers replaced raw numbers with names. Compilers then let people write "
    "for the problem rather than the machine. Each layer hid the one below it and "
    "made the next one possible. "
)

TEXT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:",
    "Q: What is 12 times 12?\nA:",
    "import numpy as np\n\n# compute the mean of a list\n",
    "The quick brown fox",
    "Translate to French: Good morning, how are you?",
    "Photosynthesis is the process by which",
    "A haiku about autumn:\n",
    "SELECT name, age FROM users WHERE",
    "In 1969, astronauts",
    PARAGRAPH * 2 + "In one sentence, the main idea is",
    PARAGRAPH * 6 + "Summary:",
    PARAGRAPH * 12 + "To conclude,",
    PARAGRAPH * 17 + "The next layer will be",
]

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the boiling point of water?"}],
    [{"role": "user", "content": "Write a short poem about the moon."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime number larger than 10."},
    ],
    [{"role": "user", "content": "Explain recursion to a child."}],
    [{"role": "user", "content": PARAGRAPH * 4 + "\nWhat is this text about?"}],
]

# Token-id prompts: a single token, and a few short ones.
TOKEN_PROMPTS = [[504], [1, 2, 3], [28, 253, 1209, 30]]
