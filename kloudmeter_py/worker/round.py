"""What the steps of a runner (worker.runner) hand each other: a round of messages taken from
the consumers (take), folded into parts per series and window (worker.fold, core.plan), spread
into the keys it changes and written (worker.write); and the exceptions that start a runner
again from its partitions' checkpoints."""

from kloudmeter_py.core.models import Event
from kloudmeter_py.core.plan import CorrectionRow, Item, KeyWork, Rebuilt, Series, WKey
from kloudmeter_py.store.wire import WireMsg
from kloudmeter_py.worker.corrections import Pending

# Events that cannot be used, by (stream seq, meter id or ""): the message, the meter and why.
Dead = dict[tuple[int, str], tuple[WireMsg, str | None, str]]


class Restart(Exception):
    """Start the worker's consumer again from its partitions' checkpoints."""


class Regroup(Restart):
    """Start again from the checkpoints, everything read so far written: a runner of every
    partition turns from one consumer to one per partition or back (see core.rounds.split)."""


# (message, stream seq, event time ms, event)
Row = tuple[WireMsg, int, int, Event]


class Round:
    """One write round: its messages, its events folded per series and finest window, the
    work per key (store, key) and, only when needed, the events per key one by one."""

    def __init__(self, levels: list[tuple[int, int, int]], position: int) -> None:
        self.levels = levels
        self.last = position  # highest stream sequence in the round
        # The ack subjects of the last message taken from each consumer: acknowledged after
        # the round (AckAll), and the position each partition's consumer has reached.
        self.marks: list[str] = []
        # With a consumer per partition: the last sequence taken from each partition.
        self.lasts: dict[int, int] = {}
        self.rows: list[tuple[WireMsg, int, int]] = []  # (message, stream seq, stored-at ms)
        # the same rows by NATS subject (one event type and subject), until they are folded
        self.by_subject: dict[str, list[tuple[WireMsg, int, int]]] = {}
        self.series: Series = {}  # (reading key, finest window) -> part
        self.dead: Dead = {}
        self.dropped: set[int] = set()  # sequences dropped by the long dedup
        # store 0 is the readings bucket, 1.. the summary levels
        self.work: dict[WKey, KeyWork] = {}
        self.items: dict[WKey, list[Item]] | None = None
        self._by_seq: dict[int, WireMsg] | None = None
        # Correction events, set aside until the round's other events are folded, then
        # resolved (worker.corrections) into what each takes out and puts in.
        self.corrections: list[Pending] = []
        self.correction_rows: list[CorrectionRow] = []
        self.rebuilt: list[Rebuilt] = []  # unique meters' states rebuilt at corrections
        self.held = 0  # estimated bytes of the pages the round parked (KeyStore.park)
        self.heavy = False  # its events came at core.rounds.HEAVY a second or more
        # The first round after the runner turned to another partition's backlog (or back
        # to all of them, see core.rounds.focus); and whether what is cached is then written
        # and let go before it (core.rounds.lets_go), decided once where the round is handed
        # to Runner._process.
        self.switch = False
        self.let_go = False

    def release(self) -> None:
        """Drop what only the round's write needed (its messages, keys and parts)."""
        self.rows = []
        self.work = {}
        self.items = None
        self._by_seq = None
        self.corrections = []
        self.correction_rows = []
        self.rebuilt = []

    def by_seq(self) -> dict[int, WireMsg]:
        if self._by_seq is None:
            self._by_seq = {seq: msg for msg, seq, _ in self.rows}
        return self._by_seq
