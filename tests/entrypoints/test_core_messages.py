"""The engine process's outputs travel as rows (plain tuples): a row gives
back the RequestOutput it was made from, every field included, and a step's
Outputs message decodes to the outputs and errors the sinks were given."""

import dataclasses
import pickle

from pyvlm.entrypoints.core_messages import Outputs, encode, output_from_row, output_row
from pyvlm.entrypoints.engine_core import Outbox
from pyvlm.scheduling.errors import RequestFailedError
from pyvlm.scheduling.request import RequestOutput


def an_output(rid: str = "r") -> RequestOutput:
    """A RequestOutput whose every field differs from its default."""
    return RequestOutput(rid=rid, new_token_ids=[5, 6], new_text="é x", finished=True,
                         finish_reason="stop", matched_stop="\n", prompt_tokens=7,
                         completion_tokens=2, cached_tokens=4,
                         new_logprobs=[(5, -0.5, ((5, -0.5), (9, -1.25)))], error="boom")


def test_a_row_gives_back_every_field():
    out = an_output()
    defaults = RequestOutput("", [], "", False, None, None, 0, 0, 0)
    for field in dataclasses.fields(RequestOutput):  # (a new field is covered too)
        assert getattr(out, field.name) != getattr(defaults, field.name), field.name
    assert output_from_row(output_row(out)) == out
    assert output_from_row(pickle.loads(pickle.dumps(output_row(out)))) == out


def test_a_flushed_step_decodes_to_what_its_sinks_were_given():
    sent = []

    class Sender:
        def send(self, message):
            sent.append(encode(message))

    outbox = Outbox(Sender())
    first, second = an_output("a"), dataclasses.replace(an_output("b"), finished=False)
    outbox.sink_for("a")(first, None)
    outbox.sink_for("b")(second, None)
    outbox.sink_for("c")(None, RequestFailedError("it failed"))
    outbox.flush()
    [message] = [pickle.loads(blob) for blob in sent]
    assert isinstance(message, Outputs)
    (rid_a, row_a, err_a), (rid_b, row_b, _), (rid_c, row_c, err_c) = message.items
    assert (rid_a, output_from_row(row_a), err_a) == ("a", first, None)
    assert (rid_b, output_from_row(row_b)) == ("b", second)
    assert rid_c == "c" and row_c is None and isinstance(err_c, RequestFailedError)
    assert str(err_c) == "it failed"
