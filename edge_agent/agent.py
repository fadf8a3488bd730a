"""The edge agent: a sans-I/O core and the thin adapter that connects it to MQTT.

:class:`AgentCore` takes messages (topic, payload) and returns actions: a
:class:`~edge_agent.mqtt.Publish`, or :class:`Train` to ask for the (slow)
training of one round. It has no socket, thread or clock, so every rule of
the agent's side of the round protocol is unit-testable. :class:`AgentRunner`
binds a core to a :class:`~edge_agent.mqtt.Connection`.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import __version__, chunking, dp, wire
from .agent_store import AgentStore
from .compression import ErrorFeedback
from .data import DataError, LocalData
from .eligibility import EligibilityConfig, check_device
from .model_api import FedModel, ModelError, TrainData
from .model_loader import model_for_spec
from .models import subtract
from .mqtt import Connection, Loop, Publish
from .signing import SignatureError, Verifier
from .spec import MODEL_KINDS, ModelSpec
from .ratelog import RejectionLog
from .topics import Topics
from .training import round_seed

log = logging.getLogger(__name__)

# Replay protection (docs/PROTOCOL.md §4.2, *Replays*): where a model or task
# stands in the sequence the aggregator publishes. Tuples compare in order,
# the federation run first, so a reset federation (a larger run) is ahead of
# everything its predecessor published.
ModelKey = tuple[int, int]  # (run, round)
TaskKey = tuple[int, int, int, int]  # (run, round the task is for, attempt, stage)
# For one (round, attempt) the aggregator publishes waiting, then open. A done
# task stands where the next waiting task would: it follows that waiting task
# when the privacy budget ends the run, and precedes it when a finished
# federation is continued (more rounds, a larger budget), so it ranks equal.
_TASK_STAGE = {"waiting": 0, "open": 1, "done": 0}
# `selected` notices held (by arrival, the oldest dropped first). The aggregator
# has one attempt open at a time and publishes its notices before its task,
# so one would do; a few more keep a notice whose task is still on its way
# when a reordering or a forged notice (a broker without ACL) comes between.
MAX_HELD_NOTICES = 4


def model_key(msg: wire.ModelMsg) -> ModelKey:
    return (msg.run, msg.round)


def task_key(msg: wire.TaskMsg) -> TaskKey:
    """The task's place: a done task's ``round`` is the final model round, the others' the next round."""
    rnd = msg.round + 1 if msg.state == "done" else msg.round
    return (msg.run, rnd, msg.attempt, _TASK_STAGE[msg.state])


def _reach(key: ModelKey | TaskKey, kind: str) -> tuple[int, int]:
    """(run, round) a model or task shows the federation has reached: round m's model precedes round m+1's tasks."""
    return (key[0], key[1] + 1) if kind == "model" else (key[0], key[1])


@dataclass
class Train:
    """Action: train for ``round``/``attempt`` (the adapter runs it, then calls :meth:`AgentCore.train`)."""

    round: int
    attempt: int = 0


@dataclass
class Done:
    """Action: the federation finished (task state ``done``)."""

    round: int


@dataclass
class SaveTrained:
    """Action: persist the set of (round, attempt) already trained, before training."""

    trained: set[tuple[int, int]]


@dataclass
class PutOutbox:
    """Action: keep this update on disk until its round is over."""

    key: tuple[int, int]
    payload: bytes
    # A compressed update: the error-feedback memory after it, persisted with it.
    feedback: ErrorFeedback | None = None


@dataclass
class DropFeedback:
    """Action: forget the persisted error-feedback memory of update compression (a new federation run)."""


@dataclass
class SaveTrustedKeys:
    """Action: persist the trusted signing keys (after a signed key rollover)."""

    keys: list[str]


@dataclass
class DropOutbox:
    """Action: the round of this outbox entry is over."""

    key: tuple[int, int]


@dataclass
class SaveAccepted:
    """Action: persist the newest model and task accepted (replay protection across restarts)."""

    model: ModelKey | None
    task: TaskKey | None


Action = (Publish | Train | Done | SaveTrained | PutOutbox | DropOutbox | SaveTrustedKeys | SaveAccepted
          | DropFeedback)


@dataclass
class AgentCore:
    """The decision logic of one agent.

    Rules: train only when eligible and selected (by our retained notice, or
    by an async task) for an open task whose base version equals the model
    we hold; train at most once per (round,
    attempt), remembered across restarts; keep each update in the outbox
    until its round is over and send it again after a reconnect while the
    round is open; drop anything malformed with a counted reason and leave
    state unchanged; refuse a model or task older than the newest accepted
    (``replayed``), also across restarts; a larger run id is a reset
    federation: follow it and forget the old run's trained rounds and outbox.
    """

    agent_id: str
    fed: str
    data: LocalData
    seed: int = 0
    capabilities: tuple[str, ...] = MODEL_KINDS
    # The device's own model ([model] kind in its config, or the Python
    # API): the federation's spec must match it. None: any built-in kind.
    model: FedModel | None = None
    topics: Topics = field(init=False)
    model_msg: wire.ModelMsg | None = field(default=None, init=False)
    task: wire.TaskMsg | None = field(default=None, init=False)
    # The last `selected` notices for this agent, by (run, round, attempt,
    # base), oldest first: one selects us for the open task with that key and
    # for nothing else.
    notices: dict[tuple[int, int, int, str], wire.SelectedMsg] = field(default_factory=dict, init=False)
    trained: set[tuple[int, int]] = field(default_factory=set)
    outbox: dict[tuple[int, int], bytes] = field(default_factory=dict)
    # Update compression's error feedback: what earlier compressed updates
    # left unsent (loaded from and saved with the outbox).
    feedback: ErrorFeedback = field(default_factory=ErrorFeedback)
    # The newest model and task accepted (loaded from and saved to the store):
    # anything older is a replay, signed or not.
    accepted_model: ModelKey | None = None
    accepted_task: TaskKey | None = None
    eligible: bool = True
    reason: str = ""
    # Pinned model-signing keys: when set, only signed models and tasks count.
    verifier: Verifier | None = None
    # In a provisioned federation: this device's certificate and key sign its
    # secure-aggregation keys, and peers' advertisements are checked against
    # the federation's CA (edge_agent.secagg.identity).
    secagg_identity: object | None = None
    secagg_verifier: object | None = None
    # The device's side of the open secure-aggregation round (edge_agent.secagg.client).
    secagg_client: object | None = field(default=None, init=False)
    # Keep the local sample count out of the public retained status. Turned
    # on by the agent's config, and by the first task that asks for DP.
    private: bool = False
    rejected: Counter = field(default_factory=Counter, init=False)
    # Why this device cannot train, as (code, detail), e.g. ("bad_data",
    # "labels range over 0..11, the model has classes 0..9"): published in
    # the status, which makes it not eligible. Data and model mismatches are
    # checked again when another model spec arrives; a failing training loop
    # or bad parameters from it stay until the agent restarts.
    problem: tuple[str, str] | None = field(default=None, init=False)
    _problem_sticky: bool = field(default=False, init=False)
    _rejection_log: RejectionLog = field(default_factory=lambda: RejectionLog(log, "dropped message"), init=False,
                                         repr=False)
    _checked: ModelSpec | None = field(default=None, init=False)
    resent: set[tuple[int, int]] = field(default_factory=set, init=False)
    retry_after: float = field(default=0.0, init=False)
    updates_sent: int = field(default=0, init=False)
    finished: bool = field(default=False, init=False)
    # A model too large for one packet, being fetched from its retained chunks
    # (docs/PROTOCOL.md §8): one payload buffer at most, and the SHA-256 of the
    # last one completed (its manifest again, e.g. after a reconnect, is not fetched twice).
    model_chunks: chunking.Reassembler | None = field(default=None, init=False, repr=False)
    _model_fetched: bytes = field(default=b"", init=False, repr=False)
    # Largest chunked model fetched (bytes): one model of spec.MAX_PARAMS.
    max_model_bytes: int = chunking.MAX_TOTAL_BYTES

    def __post_init__(self) -> None:
        self.topics = Topics(self.fed)
        if not wire.valid_id(self.agent_id):
            raise ValueError(f"agent id {self.agent_id!r} must match [A-Za-z0-9_-]{{1,64}}")
        if self.model is not None:
            # A device with its own model checks its data once, at start:
            # a mismatch is a configuration error (ModelError), not a round
            # that fails later.
            self.capabilities = (self.model.kind,)
            self._check_data(self.model)

    # -- what to say and hear -------------------------------------------------

    def subscriptions(self) -> list[str]:
        # Our `selected` notice before the task: the broker then sends the
        # retained notice first, so a reconnecting agent that is selected does
        # not see the open task without it (either order works, this one logs less).
        # The inbox carries secure-aggregation messages addressed to this device.
        subs = [self.topics.model, self.topics.selected(self.agent_id), self.topics.task,
                self.topics.inbox(self.agent_id)]
        return subs + [self.topics.keys] if self.verifier is not None else subs

    def status(self, state: str = "online") -> Publish:
        """The retained status message (``offline`` is also the last will)."""
        msg = wire.StatusMsg(
            fed=self.fed,
            round=self.model_msg.round if self.model_msg else 0,
            agent=self.agent_id,
            state=state,
            num_samples=0 if self.private else self.data.num_samples,
            capabilities=list(self.capabilities),
            software=__version__,
            eligible=self.eligible and self.problem is None,
            reason=f"{self.problem[0]}: {self.problem[1]}" if self.problem else self.reason,
        )
        return Publish(self.topics.status(self.agent_id), wire.encode(msg), qos=1, retain=True)

    # -- events ---------------------------------------------------------------

    def receive(self, topic: str, payload: bytes, props: dict[str, str] | None = None) -> list[Action]:
        """One message from the broker (with its MQTT v5 user properties); returns what to do about it."""
        kind, addressee = self.topics.parse(topic)
        if not payload:
            return []  # a cleared retained message: nothing to act on
        if not kind and self.topics.parse_chunk(topic)[0] == "model_chunk":
            return self._on_model_chunk(payload)  # checked against the (signed) manifest, not signed itself
        if self.verifier is not None and kind in ("model", "task", "keys", "selected"):
            try:
                self.verifier.verify(topic, payload, props or {})
            except SignatureError as exc:
                self._reject(exc.reason, str(exc))
                if kind == "model" and self.model_msg is None and self.accepted_model is None:
                    # No trusted model ever came: this device's pinned key does not match
                    # the aggregator's. Say so in the status, so it is not selected. Once a
                    # trusted model was accepted, a badly signed one is a forgery to drop
                    # (counted): it must not take the fleet out of the next round.
                    return self._set_problem("untrusted_key", exc.detail if exc.reason == "untrusted_key" else str(exc))
                return []
        if kind == "model" and chunking.looks_like_manifest(payload):
            return self._on_model_manifest(payload)
        if kind == "inbox":
            if addressee != self.agent_id:
                return self._reject("not_for_us", f"{topic} is another device's inbox")
            return self._on_inbox(payload)
        if kind == "selected" and addressee != self.agent_id:
            return self._reject("not_for_us", f"{topic} is another device's notice")
        try:
            if kind == "model":
                return self._on_model(wire.decode(payload, expect="model", fed=self.fed))
            if kind == "task":
                return self._on_task(wire.decode(payload, expect="task", fed=self.fed))
            if kind == "selected":
                return self._on_selected(wire.decode(payload, expect="selected", fed=self.fed))
            if kind == "keys" and self.verifier is not None:
                # Signed by a key we trust (checked above): trust what it announces.
                new = self.verifier.add(wire.decode(payload, expect="keys", fed=self.fed).keys)
                if new:
                    log.info("%s: now trusting signing key(s) %s", self.agent_id, ", ".join(k[:16] for k in new))
                    return [SaveTrustedKeys(self.verifier.trusted)]
                return []
        except wire.WireError as exc:
            return self._reject(exc.reason, f"{topic}: {exc.detail}")
        return []

    def _on_inbox(self, payload: bytes) -> list[Action]:
        """A secure-aggregation message for this device: the next step of its round."""
        client = self.secagg_client
        if client is None:
            return self._reject("secagg_no_round", "inbox message while not in a secure-aggregation round")
        from .secagg import messages as sam
        from .secagg.client import SecAggError

        try:
            msg = sam.decode(payload, fed=self.fed, kinds=sam.SERVER_KINDS)
            step = {sam.SAPeers: client.on_peers, sam.SARoute: client.on_route,
                    sam.SAUnmaskReq: client.on_unmask_req}[type(msg)]
            reply = step(msg)
        except wire.WireError as exc:
            return self._reject(f"secagg_{exc.reason}", exc.detail)
        except SecAggError as exc:
            return self._reject(f"secagg_{exc.reason}", str(exc))
        for reason, detail in client.problems:
            self._reject(f"secagg_{reason}", detail)
        client.problems.clear()
        return [Publish(self.topics.update(self.agent_id), sam.encode(reply), qos=1, retain=False)]

    def _fit(self, m: wire.ModelMsg, config: wire.TrainConfig, round_number: int):
        """Evaluate the global model on the holdout and train from it: (metrics, new parameters).

        The model may be the user's code: anything it raises, and any
        parameters or metrics that are not what the spec says, become a
        ModelError (``training_failed`` or ``bad_params``), and nothing is sent.
        """
        model = model_for_spec(m.spec, self.model)
        metrics: dict[str, float] = {}
        where = f"{model.kind} model"
        try:
            if len(self.data.X_holdout):
                ev = model.evaluate(m.params, self.data.X_holdout, self.data.y_holdout)
                metrics.update({f"eval_{k}": float(v) for k, v in ev.items()})
                metrics["eval_samples"] = float(len(self.data.X_holdout))
            data = TrainData(self.data.X_train, self.data.y_train, self.data.num_samples, self.data.batches,
                             self.data.source)
            local, train_metrics = model.fit(m.params, data, config, round_seed(self.seed, round_number))
            metrics.update({k: float(v) for k, v in dict(train_metrics).items()})
        except ModelError:
            raise
        except DataError as exc:  # a malformed batch from a stream
            raise ModelError("bad_data", str(exc)) from None
        except Exception as exc:  # the user's training loop: whatever it raises stops this device, not the agent
            log.exception("%s: %s failed", self.agent_id, where)
            raise ModelError("training_failed", f"{where}: {type(exc).__name__}: {exc}") from None
        local = model.check_params(local, f"{where}.fit")
        bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
        if bad:
            raise ModelError("bad_params", f"{where}: metrics {bad} are NaN or Inf")
        return metrics, local

    def _reject(self, reason: str, detail: str) -> list[Action]:
        self.rejected[reason] += 1
        self._rejection_log.log(reason, detail, prefix=f"{self.agent_id}: ")
        return []

    def _on_model(self, msg: wire.ModelMsg) -> list[Action]:
        if wire.params_version(msg.params) != msg.version:
            return self._reject("bad_version_hash", f"model of round {msg.round} does not hash to {msg.version}")
        key = model_key(msg)
        why = self._replayed(key, "model")
        if why:  # before the model check: a stale model must not change what the status says
            return self._reject("replayed", why)
        fits, actions = self._check_model(msg.spec)
        if not fits:
            return actions
        if self.run is None and self.trained and msg.round < max(r for r, _ in self.trained) - 1:
            # No run id accepted yet (state of a version before run ids) and
            # this run never got that far: what we remember trained belongs
            # to a federation that was started over.
            actions += self._forget_run(f"model of round {msg.round}, behind the rounds we trained")
        actions += self._accept(key, "model")
        self.model_msg = msg
        return actions + self._maybe_train()

    def _check_model(self, spec: ModelSpec) -> tuple[bool, list[Action]]:
        """Can this device train ``spec`` on its data? If not: count it and say so in the status.

        A model that fits clears a problem an earlier model caused (not one
        its training caused: that stays until the agent restarts).
        """
        if spec != self._checked:
            try:
                if spec.kind not in self.capabilities:
                    raise ModelError("unsupported_model", f"model kind {spec.kind} not in {self.capabilities}")
                self._check_data(model_for_spec(spec, self.model))
            except ModelError as exc:
                self._reject(exc.reason, exc.detail)
                return False, self._set_problem(exc.reason, exc.detail)
            self._checked = spec
        if self.problem is not None and not self._problem_sticky:
            return True, self.clear_problem(self.problem[0])  # the new model fits this device again
        return True, []

    def _set_problem(self, code: str, detail: str, sticky: bool = False) -> list[Action]:
        """This device cannot train: log it once and publish it in the status (so it is not selected).

        ``sticky``: the model's own training failed, which another model
        message does not mend.
        """
        if self.problem is not None and (self.problem[0] == code or (self._problem_sticky and not sticky)):
            # Said already (the detail may differ, e.g. another key's fingerprint: no
            # new status for it), or a failure of this device's own code that a model
            # problem must not hide, since a fitting model would then clear both.
            return []
        self.problem = (code, detail)
        self._problem_sticky = sticky
        log.error("%s: cannot train (%s): %s", self.agent_id, code, detail)
        return [self.status("online")]

    def suspect_duplicate(self, problem: str) -> list[Action]:
        """Another client seems to use our client id: not selectable until that stops (said in the status)."""
        return self._set_problem("duplicate_id", problem, sticky=True)

    def clear_problem(self, code: str) -> list[Action]:
        """The problem ``code`` is over (e.g. the connection stays up again): selectable again."""
        if self.problem is None or self.problem[0] != code:
            return []
        log.info("%s: %s is over", self.agent_id, code)
        self.problem = None
        self._problem_sticky = False
        return [self.status("online")]

    def too_large(self, topic: str, size: int, limit: int) -> list[Action]:
        """A publish the broker would refuse: this device does not take part again until it restarts
        (after the broker's limit or the model was changed)."""
        what = "update" if topic == self.topics.update(self.agent_id) else f"message on {topic}"
        return self._set_problem("payload_too_large", f"an {what} of {size} bytes exceeds the broker's maximum "
                                 f"packet size of {limit} bytes", sticky=True)

    def _check_data(self, model: FedModel) -> None:
        """Raise ModelError unless the local data fits ``model`` (features, label range, finite values)."""
        d = self.data
        if d.X_train is not None and d.y_train is not None:
            # Training and holdout rows together: the message then gives the whole label range.
            both = len(d.X_holdout) > 0
            X = np.concatenate([d.X_train, d.X_holdout]) if both else d.X_train
            y = np.concatenate([d.y_train, d.y_holdout]) if both else d.y_train
            model.check_data(X, y, "local data")
            return
        try:
            X, y = d.training_rows()
        except DataError as exc:
            raise ModelError("bad_data", str(exc)) from None
        model.check_data(X, y, "first training batch")
        if len(d.X_holdout):
            model.check_data(d.X_holdout, d.y_holdout, "holdout data")

    # -- replay protection ----------------------------------------------------

    @property
    def run(self) -> int | None:
        """The newest federation run accepted (None before the first model or task)."""
        runs = [k[0] for k in (self.accepted_model, self.accepted_task) if k is not None]
        return max(runs) if runs else None

    def _replayed(self, key: ModelKey | TaskKey, kind: str) -> str:
        """Why a model or task with this key is older than what we accepted ("" if it is not).

        An equal key is accepted: the same retained message again, or
        republished by a restarted aggregator. Only a model or task that the
        aggregator published before one we accepted is refused, so a replay
        (signed or not) or a stale redelivery cannot move the agent back.
        """
        newest = self.accepted_model if kind == "model" else self.accepted_task
        if newest is not None and key < newest:
            return f"{kind} {key} is older than the {kind} {newest} already accepted (run, round, ...)"
        reached = [_reach(k, n) for k, n in ((self.accepted_model, "model"), (self.accepted_task, "task")) if k]
        if reached and _reach(key, kind) < max(reached):
            return f"{kind} {key} is behind run and round {max(reached)} already reached"
        return ""

    def _accept(self, key: ModelKey | TaskKey, kind: str) -> list[Action]:
        """Record an accepted key; a larger run first forgets the old run. Returns the persistence actions."""
        actions: list[Action] = []
        if self.run is not None and key[0] > self.run:
            actions += self._forget_run(f"federation run {self.run} was replaced by run {key[0]} (reset)")
        newest = self.accepted_model if kind == "model" else self.accepted_task
        if newest is None or key > newest:
            if kind == "model":
                self.accepted_model = key
            else:
                self.accepted_task = key
            # After the forgetting: a crash in between leaves the old key,
            # and the next message of the new run forgets again.
            actions.append(SaveAccepted(self.accepted_model, self.accepted_task))
        return actions

    def _forget_run(self, why: str) -> list[Action]:
        """A reset federation: its rounds start again, so the old run's trained rounds, outbox and messages go."""
        log.info("%s: %s: forgetting %d trained rounds and %d outbox entries", self.agent_id, why,
                 len(self.trained), len(self.outbox))
        actions: list[Action] = []
        if self.trained:
            self.trained.clear()
            actions.append(SaveTrained(set()))
        actions += [DropOutbox(key) for key in sorted(self.outbox)]
        self.outbox.clear()
        self.resent.clear()
        if self.feedback.residual is not None:
            # The old run's unsent leftovers belong to a model that is gone.
            self.feedback = ErrorFeedback()
            actions.append(DropFeedback())
        # The old run's model or task must not meet the new run's (a fresh
        # federation's round-0 model can have the same version as the old one's).
        # (The notices stay: one of the old run matches no task of the new
        # run, and the new run's notice may have come before its task.)
        self.model_msg = self.task = None
        self.finished = False
        return actions

    def set_eligibility(self, eligible: bool, reason: str = "") -> list[Action]:
        """The device's eligibility was checked; a change is announced in the retained status."""
        if (eligible, reason) == (self.eligible, self.reason):
            return []
        self.eligible, self.reason = eligible, reason
        log.info("%s: %s", self.agent_id, "eligible" if eligible else f"not eligible: {reason}")
        return [self.status("online"), *self._maybe_train()]

    def connected(self) -> list[Action]:
        """A (re)connection: announce ourselves; outbox entries may be sent again."""
        self.resent.clear()
        return [self.status("online"), *self._resend()]

    def _on_task(self, msg: wire.TaskMsg) -> list[Action]:
        order = task_key(msg)
        why = self._replayed(order, "task")
        if why:
            return self._reject("replayed", why)
        accepted = self._accept(order, "task")  # persisted before anything the task leads to
        self.task = msg
        c = self.secagg_client
        if c is not None and (msg.state != "open" or (msg.round, msg.attempt) != (c.round, c.attempt)):
            self.secagg_client = None  # its round is over: its secrets go with it
        actions: list[Action] = []
        if msg.config.dp_mode and not self.private:
            # A DP federation: the dataset size is not the world's business.
            self.private = True
            actions.append(self.status("online"))
        for key in sorted(self.outbox):
            if msg.state != "open" or key < (msg.round, msg.attempt):
                del self.outbox[key]  # its round is over
                actions.append(DropOutbox(key))
        if msg.state == "done":
            if not self.finished:
                self.finished = True
                actions.append(Done(msg.round))
            return accepted + actions
        if msg.state == "open" and not self._selected(msg) and msg.retry_after > 0:
            self.retry_after = msg.retry_after  # pace steering: when to look again
            log.debug("%s: not selected in round %d; next round expected in ~%.0fs",
                      self.agent_id, msg.round, msg.retry_after)
        return accepted + actions + self._resend() + self._maybe_train()

    def _on_selected(self, msg: wire.SelectedMsg) -> list[Action]:
        """A notice that we are selected for one attempt: hold it (a few at most), then try to train.

        No replay check of its own: a notice selects us only for the open task
        with the same (run, round, attempt, base), and that task passed the
        task's replay check, so an old notice selects us for nothing.
        """
        if msg.agent != self.agent_id:
            return self._reject("identity_mismatch", f"notice on our topic names {msg.agent}")
        key = (msg.run, msg.round, msg.attempt, msg.base)
        self.notices.pop(key, None)
        self.notices[key] = msg
        while len(self.notices) > MAX_HELD_NOTICES:
            del self.notices[next(iter(self.notices))]
        return self._maybe_train()

    def _selected(self, t: wire.TaskMsg) -> bool:
        """Does the open task ``t`` select this agent? (async: every eligible agent; sync: our notice says so)."""
        if t.mode == "async":
            return True
        s = self.notices.get((t.run, t.round, t.attempt, t.base))
        if s is None:
            return False
        # Secure aggregation: share points are positions in the selection, which must include us.
        return t.secagg is None or self.agent_id in s.selected

    def _selection(self, t: wire.TaskMsg) -> list[str]:
        """The whole selection of the open secure-aggregation task ``t``, from our notice for it."""
        return self.notices[(t.run, t.round, t.attempt, t.base)].selected

    def _resend(self) -> list[Action]:
        """The outbox entry of the open task, once per connection (the aggregator drops a second copy)."""
        t = self.task
        if t is None or t.state != "open":
            return []
        key = (t.round, t.attempt)
        if key not in self.outbox or key in self.resent:
            return []
        self.resent.add(key)
        log.info("%s: sending the update of round %d attempt %d again", self.agent_id, *key)
        return [Publish(self.topics.update(self.agent_id), self.outbox[key], qos=1, retain=False)]

    def _maybe_train(self) -> list[Action]:
        t, m = self.task, self.model_msg
        if t is None or m is None or t.state != "open" or not self.eligible or self.problem is not None:
            return []
        if not self._selected(t) or (t.round, t.attempt) in self.trained:
            return []
        if t.base != m.version:
            return []  # the matching model has not arrived yet; it will trigger us
        # Claim the attempt now: never train twice for it. A re-run of an
        # abandoned round is a new attempt and may select us again.
        self.trained.add((t.round, t.attempt))
        return [SaveTrained(set(self.trained)), Train(t.round, t.attempt)]

    def train(self, round_number: int, attempt: int = 0) -> list[Action]:
        """Evaluate the global model on the holdout, train locally, return the update to publish.

        Training is requested by :meth:`receive` but runs later; if the task
        changed in between (new attempt, round closed, federation done,
        deselected) the work is skipped rather than sent for a task that no
        longer stands.
        """
        t, m = self.task, self.model_msg
        if (
            t is None
            or m is None
            or t.state != "open"
            or (t.round, t.attempt) != (round_number, attempt)
            or not self._selected(t)
            or t.base != m.version
        ):
            log.info("%s: round %d attempt %d moved on before training started; skipped",
                     self.agent_id, round_number, attempt)
            return []
        try:
            metrics, local = self._fit(m, t.config, round_number)
        except ModelError as exc:
            return self._set_problem(exc.reason, exc.detail, sticky=True)
        delta = subtract(local, m.params)
        num_samples = self.data.num_samples
        if t.config.clip_norm > 0:
            # DP: bound this device's influence, and tell the aggregator
            # whether the bound bit (adaptive clipping counts these bits).
            delta, norm, within = dp.clip(delta, t.config.clip_norm)
            metrics["dp_unclipped"] = 1.0 if within else 0.0
        if t.config.noise_std > 0:
            delta = dp.add_gaussian_noise(delta, t.config.noise_std)
        if t.config.dp_mode in ("local", "distributed"):
            # The aggregator is not trusted: send only what the privacy
            # accounting covers. Losses, accuracies, the sample count and the
            # raw clipping bit are not noised, so they stay on the device.
            noised_bit = {}
            if t.config.count_noise_std > 0:
                noised_bit["dp_bit"] = dp.centred_bit(metrics.get("dp_unclipped") == 1.0) + float(
                    dp.SecureRandom().normal(0.0, t.config.count_noise_std))
            metrics, num_samples = noised_bit, 1
        if t.secagg is not None:
            # Secure aggregation: the update leaves the device only quantized
            # and masked (stage 3); this starts the protocol with our keys.
            from .secagg.client import SecAggClient

            weight = min(max(1, self.data.num_samples), t.secagg.max_weight) if t.secagg.max_weight else 1
            self.secagg_client = SecAggClient(self.fed, self.agent_id, round_number, attempt, self._selection(t),
                                              t.secagg, m.spec.flatten(delta), identity=self.secagg_identity,
                                              verifier=self.secagg_verifier, weight=weight)
            self.updates_sent += 1
            from .secagg.messages import encode as encode_secagg

            return [Publish(self.topics.update(self.agent_id), encode_secagg(self.secagg_client.advertise()),
                            qos=1, retain=False)]
        feedback = None
        if t.config.compression != "none":
            # Compression comes last, after clipping and noise: it is
            # post-processing of the noised update (and the residual only
            # ever holds parts of updates already clipped and noised), so
            # the DP guarantee is unchanged. A compressed update can be
            # longer than clip_norm (quantization noise, a residual carried
            # in): the trusted aggregator of central DP clips what it
            # decodes again, and in local/distributed DP the noise was added
            # before anything here. Secure-aggregation rounds returned above:
            # they quantize and mask the update themselves.
            rng = np.random.default_rng((self.seed, round_number, attempt, zlib.crc32(self.agent_id.encode())))
            delta = self.feedback.compress(delta, round_number, attempt, t.config.compression, rng,
                                           t.config.topk_fraction)
            feedback = self.feedback
        update = wire.UpdateMsg(
            fed=self.fed,
            round=round_number,
            agent=self.agent_id,
            base=m.version,
            num_samples=num_samples,
            delta=delta,
            metrics=metrics,
        )
        self.updates_sent += 1
        payload = wire.encode(update)
        key = (round_number, attempt)
        self.outbox[key] = payload
        self.resent.add(key)  # this send counts for the current connection
        return [PutOutbox(key, payload, feedback),
                Publish(self.topics.update(self.agent_id), payload, qos=1, retain=False)]

    # -- models in chunks (docs/PROTOCOL.md §8) ---------------------------------

    def fetch_topics(self) -> list[str]:
        """The retained chunk topics of the model being fetched that are still missing (subscribed on reconnect)."""
        r = self.model_chunks
        return [self.topics.model_chunk(i) for i in r.missing()] if r is not None else []

    def _on_model_manifest(self, payload: bytes) -> list[Action]:
        """A model too large for one packet: subscribe to its missing retained chunks."""
        try:
            m = chunking.decode_manifest(payload, fed=self.fed)
            if m.of != "model":
                raise chunking.ChunkError("chunk_bad_manifest", f"a manifest of an {m.of} on the model topic")
            if m.sha256 == self._model_fetched and self.model_msg is not None:
                return []  # the model we hold, announced again
            if self.model_chunks is None:
                self.model_chunks = chunking.Reassembler(max_total=self.max_model_bytes)
            before = self.fetch_topics()
            if not self.model_chunks.begin(m):
                return []
        except wire.WireError as exc:
            return self._reject(exc.reason, f"model manifest: {exc.detail}")
        log.info("%s: model of round %d comes in %d chunks (%d bytes, payload %s)", self.agent_id, m.round, m.count,
                 m.size, m.id)
        wanted = self.fetch_topics()
        stale = sorted(set(before) - set(wanted))
        # Subscribing again to a topic we hold makes the broker send its retained chunk again.
        return ([chunking.Unsubscribe(stale)] if stale else []) + [chunking.Subscribe(wanted)]

    def _on_model_chunk(self, payload: bytes) -> list[Action]:
        r = self.model_chunks
        if r is None or r.manifest is None:
            return []  # no fetch in progress: a retained chunk of a model we already hold
        m = r.manifest
        try:
            done = r.add(chunking.decode_chunk(payload, fed=self.fed))
        except chunking.ChunkError as exc:
            if exc.reason == "chunk_without_manifest":
                return []  # a newer model's chunk ahead of its manifest, or an older one's: not an error
            return self._reject(exc.reason, f"model chunk: {exc.detail}")
        except wire.WireError as exc:
            return self._reject(exc.reason, f"model chunk: {exc.detail}")
        if done is None:
            return []
        actions: list[Action] = [chunking.Unsubscribe([self.topics.model_chunk(i) for i in range(m.count)])]
        try:
            # The chunks match the manifest, whose signature (if keys are pinned) was checked.
            msg = wire.decode(done, expect="model", fed=self.fed, max_bytes=max(wire.MAX_PAYLOAD_BYTES, len(done)))
        except wire.WireError as exc:
            return actions + self._reject(exc.reason, f"chunked model {m.id}: {exc.detail}")
        finally:
            del done  # the reassembly buffer: the decoded arrays are copies
        self._model_fetched = m.sha256
        return actions + self._on_model(msg)


class AgentRunner:
    """Adapter: runs an :class:`AgentCore` over one MQTT connection on a :class:`Loop`.

    With a ``store`` the trained rounds and the outbox live on disk; with an
    ``eligibility`` config the device is checked every ``check_every``
    seconds and a change is published in its status.
    """

    def __init__(
        self,
        loop: Loop,
        core: AgentCore,
        broker,
        on_done: Callable[["AgentRunner"], None] | None = None,
        store: AgentStore | None = None,
        eligibility: EligibilityConfig | None = None,
        train_delay: float = 0.0,
        on_connect: Callable[["AgentRunner"], None] | None = None,
        on_stop: Callable[["AgentRunner", str], None] | None = None,
    ) -> None:
        self.core = core
        # Called instead of stopping the loop when the connection failed for good.
        self.on_stop = on_stop
        # Called after every (re)connection, once the online status is queued (systemd READY=1).
        self.on_connect = on_connect
        # Simulated compute time (fedmqtt sim --train-delay): a slow device,
        # without blocking the loop that the other simulated agents share.
        self.train_delay = train_delay
        self.loop = loop
        self.on_done = on_done
        self.store = store
        # The chunked update being sent (docs/PROTOCOL.md §8), if any.
        self._outgoing: chunking.Outgoing | None = None
        self.eligibility = eligibility
        if store is not None:
            core.trained |= store.load_trained()
            core.outbox.update(store.load_outbox())
            core.feedback = store.load_feedback()
            core.accepted_model, core.accepted_task = store.load_accepted()
            if core.verifier is not None:
                core.verifier.add(store.load_trusted_keys())  # learned through signed rollovers
        if eligibility is not None:
            core.set_eligibility(*check_device(eligibility))
        self.conn = Connection(
            loop,
            broker,
            client_id=f"fedmqtt-{core.fed}-{core.agent_id}",
            handler=self,
            will=core.status("offline"),
        )

    def start(self) -> None:
        self.conn.open()
        if self.eligibility is not None:
            self.loop.call_every(
                self.eligibility.check_every,
                lambda: self._execute(self.core.set_eligibility(*check_device(self.eligibility))),
            )

    # Handler protocol
    def subscriptions(self) -> list[str]:
        # and the chunks still missing of a model being fetched: the broker sends them again (retained)
        return self.core.subscriptions() + self.core.fetch_topics()

    def on_published(self, conn: Connection, mid: int) -> None:
        """The broker acknowledged a publish: a chunk of the update being sent makes room for the next."""
        out = self._outgoing
        if out is not None and out.published(mid):
            if out.done:
                log.info("%s: chunked update %s delivered (%d chunks)", self.core.agent_id, out.manifest.id,
                         out.manifest.count)
            self._pump()

    def _send_chunked(self, a: Publish) -> bool:
        """Send an update above the packet limit as a manifest and chunks (docs/PROTOCOL.md §8); False if it fits.

        The same payload again (the outbox resent after a reconnect) sends only
        the chunks never handed to the MQTT client: acknowledged ones are not
        sent again, and the ones in flight are paho's to resend.
        """
        core = self.core
        if a.topic != core.topics.update(core.agent_id):
            return False
        limit = chunking.effective_limit(self.conn.max_packet_size, getattr(self.conn.broker, "max_packet_size", 0))
        if self.conn.packet_size(a) <= limit:
            return False
        out = self._outgoing
        try:
            size = chunking.chunk_size_for(limit)
            if out is None or out.manifest.chunk_size != size or bytes(out.manifest.sha256) != hashlib.sha256(
                    a.payload).digest():
                rnd = core.task.round if core.task is not None else 0
                m, pieces = chunking.split(a.payload, size, fed=core.fed, round=rnd, of="update")
                self._outgoing = chunking.Outgoing(m, pieces)
                log.info("%s: update of %d bytes goes in %d chunks of %d bytes (payload %s)", core.agent_id,
                         m.size, m.count, size, m.id)
        except ValueError as exc:  # the limit is too small to chunk this payload
            log.error("%s: cannot send the update in chunks: %s", core.agent_id, exc)
            return False  # so the connection refuses it as too large, and the device says so (payload_too_large)
        self._pump()
        return True

    def _pump(self) -> None:
        """Hand the next chunks of the update being sent to the MQTT client, within the send window."""
        out = self._outgoing
        if out is None:
            return
        topic = self.core.topics.update_chunks(self.core.agent_id)
        for i in out.due():
            mid = self.conn.publish_tracked(Publish(topic, out.message(i), qos=1, retain=False))
            if mid is None:
                return  # refused now (queue full): the next ack or reconnect tries again
            out.sent(i, mid)

    def on_takeover_suspected(self, conn: Connection, problem: str) -> None:
        self.core.suspect_duplicate(problem)  # published with the status at the next connection

    def on_takeover_cleared(self, conn: Connection) -> None:
        self._execute(self.core.clear_problem("duplicate_id"))

    def on_too_large(self, conn: Connection, msg: Publish, size: int) -> None:
        self._execute(self.core.too_large(msg.topic, size, conn.max_packet_size))

    def on_fatal(self, conn: Connection, problem: str) -> None:
        """The broker refused us for good (login, duplicate client id): stop, saying why."""
        if self.on_stop is not None:
            self.on_stop(self, problem)
        else:
            self.loop.stop()

    def on_connected(self, conn: Connection) -> None:
        self._execute(self.core.connected())
        self._pump()  # chunks of an update never handed over before the connection went away
        if self.on_connect is not None:
            self.on_connect(self)

    def on_message(self, conn: Connection, topic: str, payload: bytes, props: dict[str, str]) -> None:
        self._execute(self.core.receive(topic, payload, props))

    def _execute(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Publish):
                if self._send_chunked(a):
                    continue  # an update above the packet limit: sent as a manifest and chunks
                self.conn.publish(a)  # one over the broker's packet limit comes back through on_too_large
            elif isinstance(a, chunking.Subscribe):
                self.conn.subscribe(a.topics)
            elif isinstance(a, chunking.Unsubscribe):
                self.conn.unsubscribe(a.topics)
            elif isinstance(a, Train):
                # Deferred so the loop serves other clients' sockets between trainings.
                job = lambda a=a: self._execute(self.core.train(a.round, a.attempt))  # noqa: E731
                if self.train_delay > 0:
                    self.loop.call_later(self.train_delay, job)
                else:
                    self.loop.call_soon(job)
            elif isinstance(a, SaveTrained):
                if self.store is not None:
                    self.store.save_trained(a.trained)
            elif isinstance(a, PutOutbox):
                if self.store is not None:
                    self.store.put_outbox(a.key, a.payload, a.feedback)
            elif isinstance(a, DropFeedback):
                if self.store is not None:
                    self.store.drop_feedback()
            elif isinstance(a, DropOutbox):
                if self.store is not None:
                    self.store.drop_outbox(a.key)
            elif isinstance(a, SaveTrustedKeys):
                if self.store is not None:
                    self.store.save_trusted_keys(a.keys)
            elif isinstance(a, SaveAccepted):
                if self.store is not None:
                    self.store.save_accepted(a.model, a.task)
            elif isinstance(a, Done):
                log.info("%s: federation finished after round %d", self.core.agent_id, a.round)
                if self.on_done is not None:
                    self.on_done(self)
