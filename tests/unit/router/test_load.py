from tandem.router.load import ActiveSequences


def test_route_prefill_finish_cycle():
    a = ActiveSequences()
    a.add("r1", "w0", blocks=4, prefill_tokens=50)
    a.add("r2", "w0", blocks=2, prefill_tokens=20)
    assert (a.active_blocks("w0"), a.queued_prefill_tokens("w0"), a.active_requests("w0")) == (6, 70, 2)
    assert a.decode_blocks("w0") == 0
    a.prefill_done("r1")
    a.prefill_done("r1")  # idempotent: every output may report it
    assert (a.queued_prefill_tokens("w0"), a.decode_blocks("w0")) == (20, 4)
    a.free("r1")
    a.free("r2")  # freed before its first token: its queued prefill goes too
    a.free("unknown")
    assert (a.active_blocks("w0"), a.queued_prefill_tokens("w0"), a.decode_blocks("w0")) == (0, 0, 0)
    assert a.active_requests("w0") == 0 and len(a) == 0


def test_re_add_moves_a_retried_request():
    a = ActiveSequences()
    a.add("r", "w0", 3, 10)
    a.add("r", "w1", 3, 10)
    assert a.active_blocks("w0") == 0 and a.active_blocks("w1") == 3 and a.worker_of("r") == "w1"


def test_expiry_and_worker_removal():
    a = ActiveSequences(ttl=10)
    a.add("old", "w0", 5, 5, now=0.0)
    a.add("new", "w1", 7, 7, now=8.0)
    assert a.expire(9.0) == set()
    assert a.expire(10.0) == {"w0"}, "the workers whose load changed"
    assert a.active_blocks("w0") == 0 and a.active_blocks("w1") == 7
    a.remove_worker("w1")
    assert a.active_blocks("w1") == 0 and len(a) == 0
