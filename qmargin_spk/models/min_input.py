"""The shortest waveform a speaker embedder can embed, found by running it.

The minimum depends on the architecture and the front-end, not on the weights: the demo
ECAPA-TDNN reflect-pads the input of its dilated convolutions, which needs more filterbank
frames than the padding (640 samples at 16 kHz, 5 frames). Rather than derive it layer by
layer, :func:`shortest_input` probes the forward pass: doubling lengths until one works, then
bisecting between the last failure and the first success (a forward pass that works for a
length works for every longer one).
"""

from __future__ import annotations

import torch

MAX_PROBE_SECONDS = 30.0


def shortest_input(embedder: torch.nn.Module, sample_rate: int, max_seconds: float = MAX_PROBE_SECONDS) -> int:
    """Fewest samples for which ``embedder(wavs [1, T], rel_lens [1])`` returns a finite embedding.

    The probe feeds a fixed noise waveform in eval mode under ``torch.no_grad`` with a private
    random generator: weights, BatchNorm statistics, the training flag and the global RNG are
    left as they were. It runs on one CPU thread (inputs this short gain nothing from more, and
    threads waiting on a busy machine cost seconds). ValueError when no length up to ``max_seconds`` works.
    """
    limit = max(1, int(max_seconds * sample_rate))
    device = next((tensor.device for tensor in [*embedder.parameters(), *embedder.buffers()]), torch.device("cpu"))
    noise = 0.1 * torch.randn(limit, generator=torch.Generator().manual_seed(0))
    failures: list[Exception] = []

    def works(length: int) -> bool:
        try:
            output = embedder(noise[:length].unsqueeze(0).to(device), torch.ones(1, device=device))
        except Exception as err:  # noqa: BLE001 - any failure of the forward pass means "too short"
            failures.append(err)
            return False
        return bool(torch.isfinite(output).all())

    training, threads = embedder.training, torch.get_num_threads()
    embedder.eval()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            failed, length = 0, 1
            while not works(length):
                if length == limit:
                    cause = f" ({failures[-1]})" if failures else " (non-finite embeddings)"
                    raise ValueError(f"the model embeds no input of up to {max_seconds:g} s{cause}")
                failed, length = length, min(2 * length, limit)
            while length - failed > 1:  # failed < minimum <= length
                middle = (failed + length) // 2
                failed, length = (failed, middle) if works(middle) else (middle, length)
    finally:
        torch.set_num_threads(threads)
        embedder.train(training)
    return length
