"""Edit quality on the default world at 100 sequential KDPO edits with default settings (slow: builds the world
in the test's own KDPO_HOME and edits for minutes; run with ``pytest -m slow``, as the benchmarks do)."""
import pytest

from kdpo.editing import run_sequential
from kdpo.loaders import load_requests
from kdpo.modeling import load_model
from kdpo.world import default_world

EDITS = 100


@pytest.mark.slow
def test_hundred_default_edits_hold_and_leave_the_rest_alone():
    world = default_world(progress=False)
    model, tokenizer = load_model(world.path)
    requests = load_requests(world.edits_path, limit=EDITS).requests
    summary = run_sequential(model, tokenizer, requests, "kdpo", corpus=world.corpus(), progress=False).summary()
    final = summary["final"]
    assert final["edit_success"] >= 0.99 and final["edit_success_exact"] >= 0.95, final
    assert final["generalization"] >= 0.9 and final["locality"] >= 0.95, final
    assert summary["retention"] >= 0.99, summary
    assert final["fluency"] >= 0.98 * summary["fluency_before"], summary
