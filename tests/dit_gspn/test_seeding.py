"""Per-index seeds: every (seed, index..., stream) its own stream, the same on every call."""
import numpy as np
import torch

from dit_gspn.seeding import Stream, index_generator, index_seed


def test_index_seed_is_the_seed_sequence_hash_of_the_tuple_stream_last():
    state = np.random.SeedSequence([7, 3, int(Stream.NOISE)]).generate_state(2, dtype=np.uint32)
    assert index_seed(7, 3, stream=Stream.NOISE) == (int(state[1]) << 32 | int(state[0])) & (2**63 - 1)
    state = np.random.SeedSequence([7, 3]).generate_state(2, dtype=np.uint32)  # batch sampling's sample 3
    assert index_seed(7, 3) == (int(state[1]) << 32 | int(state[0])) & (2**63 - 1)
    assert 0 <= index_seed(2**40, 2**40) < 2**63


def test_nearby_seeds_streams_and_indices_never_share_a_seed():
    keys = [(s, i, stream) for s in range(4) for i in range(200) for stream in [None, *Stream]]
    seeds = {index_seed(s, i, stream=stream) for s, i, stream in keys}
    seeds |= {index_seed(s, i, 0, stream=Stream.NOISE) for s in range(4) for i in range(200)}
    assert len(seeds) == len(keys) + 4 * 200
    # what seed * 1_000_003 + index made one stream
    assert index_seed(0, 1_000_003, stream=Stream.DATA_ORDER) != index_seed(1, 0, stream=Stream.DATA_ORDER)


def test_index_generator_repeats_its_stream():
    a = torch.randn(8, generator=index_generator(3, 1, stream=Stream.NOISE))
    b = torch.randn(8, generator=index_generator(3, 1, stream=Stream.NOISE))
    c = torch.randn(8, generator=index_generator(3, 2, stream=Stream.NOISE))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert index_generator(3, 1, device="cpu").initial_seed() == index_seed(3, 1)
