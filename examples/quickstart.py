"""Quickstart: load the default model, generate, chat, stream, read the metrics."""

from llmprod import Engine, SamplingParams

with Engine.from_pretrained("smollm2-135m") as engine:
    greedy = SamplingParams(max_tokens=32, temperature=0)

    # Many prompts in one call: continuous batching runs them together.
    for out in engine.generate(["The capital of France is", "def add(a, b):"], greedy):
        print(repr(out.text), out.finish_reason, out.usage.completion_tokens, "tokens")

    # Chat, with the model's own chat template.
    reply = engine.chat(
        [{"role": "user", "content": "Give me one tip for sleeping well."}],
        SamplingParams(max_tokens=48, temperature=0.7, seed=1),
    )
    print(reply.text)

    # Streaming: text arrives as it is generated.
    for delta in engine.stream(
        "Once upon a time", SamplingParams(max_tokens=24, seed=7)
    ):
        print(delta.text, end="", flush=True)
    print()

    m = engine.metrics()
    print(
        "requests:",
        m.requests["completed"],
        "| e2e p50:",
        round(m.latency_s["e2e"]["p50"], 3),
        "s",
    )
