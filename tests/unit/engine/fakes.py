"""A tensor-less executor for scheduler tests: the next token is a function of every token so far,
so any mistake in what the scheduler hands over (lost tokens, wrong resume point) changes outputs."""

from __future__ import annotations

from tandem.engine.executor import ExecutorOutput, SchedulerOutput


class FakeExecutor:
    def __init__(self, num_blocks: int, vocab: int = 1000, max_model_len: int = 4096, eos: int = 999) -> None:
        self.num_blocks = num_blocks
        self.vocab_size = vocab
        self.max_model_len = max_model_len
        self.eos_token_ids = (eos,)
        self.steps: list[SchedulerOutput] = []
        self.computed: dict[str, int] = {}

    def execute(self, out: SchedulerOutput) -> ExecutorOutput:
        self.steps.append(out)
        sampled = {}
        for item in out.scheduled:
            req = item.request
            # KV must be built in order, with no gap or overlap, per request.
            assert item.start == req.num_computed_tokens
            self.computed[req.request_id] = item.start + item.num_new_tokens
            if item.samples:
                token = (sum(req.all_token_ids) * 31 + len(req.all_token_ids)) % (self.vocab_size - 1)
                sampled[req.request_id] = (token, None)
        return ExecutorOutput(sampled=sampled, step_seconds=0.001)
