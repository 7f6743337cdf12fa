"""Model updates while the loop runs: the swap between two inferences, probation and roll-back, shadow runs.

A mixin of :class:`~device_agent.agent.Agent` (it works on the agent's model, bundle, policy and
stats): the :class:`~device_agent.update.updater.Updater` stages a pushed bundle off the loop, and
:meth:`LiveUpdates._apply_updates` (from ``Agent.service``) installs it, runs it beside the current
model (a shadow run), or records why it was refused. docs/agent.md, "Model updates".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from ..errors import AgentError, BundleError, ConfigError, InputError
from ..inference.classify import classify
from ..inference.fastpath import prepare
from ..inference.interpreter import TFLiteModel
from ..inference.lut import lookup_table
from ..inference.preprocess import preprocess
from ..sources import MqttSource
from .manifest import Bundle, load_bundle
from .probation import Probation, ProbationLimits
from .sandbox import trial_run
from .shadow import ShadowStats
from .updater import Failed, Staged

__all__ = ["LiveUpdates"]

log = logging.getLogger("device_agent.agent")  # the agent's own log, as before this code had a module of its own
_SHADOW_LATENCY_EVERY = 100  # shadow inferences between two latency checks (a p95 of fewer is one stall)


@dataclass
class _Shadow:
    """A candidate running beside the current model (update/shadow.py)."""

    staged: Staged
    table: Optional[np.ndarray]
    shape: Optional[tuple]
    threshold: float
    stats: ShadowStats



class LiveUpdates:
    """Update handling of the agent (a mixin: it uses the agent's attributes)."""

    # -- probation (update/probation.py) ------------------------------------
    def _probation_for_current(self, baseline_p95_ms: Optional[float]) -> Optional[Probation]:
        """A probation for the running bundle if it is an uncommitted update (None: nothing to prove)."""
        if self.updater is None:
            return None
        cur = self.updater.state.current
        if cur is None or cur.committed or cur.sha256 != self.manifest.sha256:
            return None
        return Probation(cur.label, ProbationLimits.from_config(self.config.update), baseline_p95_ms=baseline_p95_ms)

    def _probation_error(self) -> None:
        if self.probation is not None:
            self.probation.error()
            self._check_probation()  # errors end a probation at once, not at the next service()

    def _check_probation(self) -> None:
        state, why = self.probation.verdict()
        if state == "passed":
            self.probation = None
            self.updater.commit()
            log.info("bundle %s v%s passed its probation: %s", self.manifest.name, self.manifest.version, why)
        elif state == "failed":
            self._revert(why)

    def _revert(self, why: str) -> None:
        """The running bundle failed its probation: refuse it, and run the previous bundle again (kept on disk)."""
        failed, self.probation = self.manifest, None
        target = self.updater.revert(f"failed its probation: {why}")  # written before anything else happens
        try:
            if target is not None:
                bundle = load_bundle(target.path)
                if bundle.manifest.sha256 != target.sha256:
                    raise BundleError(f"its model sha256={bundle.manifest.sha256[:12]}... is not the installed "
                                      f"{target.sha256[:12]}...")
            elif self.verifier is not None:
                bundle = self.verifier.load(self.config.bundle.path, max_total=8 * self.config.update.max_bytes)
            else:
                bundle = load_bundle(self.config.bundle.path)
            model = self._open_like_running(bundle.model_path)
            try:
                ready = prepare(model, bundle.manifest)  # before anything changes: on failure the loop runs on as it is
            except BaseException:
                model.close()
                raise
        except Exception as exc:  # noqa: BLE001 - the state already says what a restart runs
            self.rollbacks += 1
            self.last_update_error = (f"bundle {failed.name} v{failed.version} failed its probation ({why}), but the "
                                      f"previous bundle cannot be opened ({exc}); a restart runs it")
            self.stats.error("update")
            log.error("%s", self.last_update_error)
            self._publish_status()
            return
        # why, first: another thread that sees the previous manifest back (set by _install) sees the reason too
        self.rollbacks += 1
        self.last_update_archive = (self.updater.state.refused[-1].archive_sha256 if self.updater.state.refused
                                    else None)
        self.last_update_error = (f"bundle {failed.name} v{failed.version} (sha256 {failed.sha256[:12]}...) failed its "
                                  f"probation: {why}; back to {bundle.manifest.name} v{bundle.manifest.version}")
        self.stats.error("update")
        self._install(bundle, model, ready)
        log.warning("%s", self.last_update_error)
        self._announce()


    def _trial_run(self, path, cancel):
        """The updater's trial run of a pushed model: a child process on the running runtime (update/sandbox.py)."""
        u = self.config.update
        return trial_run(path, runtime=self.model.runtime, threads=self.model.num_threads,
                         memory_bytes=u.trial_memory_mb << 20, timeout_s=u.trial_timeout_s, cancel=cancel)

    # -- model updates (staged by the Updater's thread, swapped here) --------
    def _open_like_running(self, path) -> TFLiteModel:
        """The new model on the runtime and thread count the running one uses (called off the loop)."""
        return TFLiteModel.open(path, self.model.runtime, self.model.num_threads)

    def _check_update(self, bundle: Bundle, model: TFLiteModel) -> None:
        """Refuse a bundle the running source cannot feed, or whose model refuses its own preprocessing."""
        new, old = bundle.manifest.preprocessing, self.manifest.preprocessing
        fixed = ("kind", "color", "raw_dtype") + (("shape",) if isinstance(self.source, MqttSource) else ())
        for key in fixed:
            if getattr(new, key) != getattr(old, key):
                raise ConfigError(  # about this board's source, not the bundle: not remembered as refused
                    f"bundle {bundle.manifest.name} v{bundle.manifest.version} has preprocessing.{key}="
                    f"{getattr(new, key)!r} but the source was opened for {getattr(old, key)!r}; "
                    "restart the agent with --bundle to change it"
                )
        if len(model.output_spec.shape) and int(model.output_spec.shape[-1]) != len(bundle.manifest.labels):
            raise BundleError(f"bundle {bundle.manifest.name} v{bundle.manifest.version}: the model has "
                              f"{model.output_spec.shape[-1]} outputs but the manifest {len(bundle.manifest.labels)} labels")
        raw_shape = tuple(new.shape) if new.shape else tuple(model.input_spec.shape[1:])
        try:
            model(preprocess(np.zeros(raw_shape, dtype=new.raw_dtype), new))
        except (InputError, RuntimeError, ValueError) as exc:
            raise BundleError(f"bundle {bundle.manifest.name} v{bundle.manifest.version} cannot run its own "
                              f"preprocessing output ({exc}); re-create it with `edgekit convert`") from exc

    def _apply_updates(self) -> None:
        while not self.updater.ready.empty():
            item = self.updater.ready.get_nowait()
            if self.shadow is not None:  # a newer desired state: the shadow run ends (promoted, replaced, aborted)
                self._end_shadow(item)
            if isinstance(item, Staged) and Path(item.bundle.path).resolve() == Path(self.bundle.path).resolve():
                item.model.close()  # the same archive was staged twice; it already runs
            elif isinstance(item, Staged) and item.meta.get("shadow"):
                self._start_shadow(item)
            elif isinstance(item, Staged):
                self._swap(item)
            elif isinstance(item, Failed):
                self._refused(item.reason, item.meta.get("archive_sha256") or item.meta.get("refused_archive"))

    def _refused(self, reason: str, archive: Optional[str]) -> None:
        """An update was refused: the running bundle stays; the count, the log and the retained status say why."""
        self.last_update_error = reason  # before the count: whoever sees the count sees why
        self.last_update_archive = archive
        self.stats.error("update")
        log.warning("update refused: %s; still running %s v%s", reason, self.manifest.name, self.manifest.version)
        self._publish_status()

    def _swap(self, staged: Staged) -> None:
        old = self.manifest
        try:
            ready = prepare(staged.model, staged.bundle.manifest)  # nothing of the running bundle changes before
        except Exception as exc:  # noqa: BLE001 - a bundle the loop cannot run is refused; the running one stays
            self._refuse_staged(staged, exc)
            return
        baseline = self.stats.latency()["p95"]  # the model being replaced, on this board, just now
        # cleared first: another thread that sees the new manifest (set last by _install) sees no stale error
        self.last_update_error = self.last_update_archive = None
        self._install(staged.bundle, staged.model, ready)
        self.updater.installed(staged)  # a restart runs it; uncommitted until its probation passes
        self.probation = self._probation_for_current(baseline_p95_ms=baseline)
        m = self.manifest
        log.info("model updated: %s v%s -> %s v%s (sha256 %s...) from %s; on probation", old.name, old.version, m.name,
                 m.version, m.sha256[:12], self.bundle.path)
        self._announce()

    def _refuse_staged(self, staged: Staged, exc: Exception) -> None:
        """Preparing the loop for a staged bundle failed: it is closed and refused, the running bundle stays.

        As the updater does with what fails while staging: a bundle error (the archive's bytes, verified, are
        at fault) is remembered, so a retained message that brings it back is refused at once; anything else
        (MemoryError on a busy board, ...) ends the attempt only, and may pass next time.
        """
        staged.model.close()
        m = staged.bundle.manifest
        remember = isinstance(exc, AgentError) and not isinstance(exc, ConfigError)
        reason = (f"bundle {m.name} v{m.version} (sha256 {m.sha256[:12]}...) cannot run on this agent: preparing its "
                  f"fast path failed ({exc.__class__.__name__}: {str(exc)[:300]})"
                  + ("; push a fixed bundle" if remember else ""))
        self.updater.not_installed(staged.slot, reason, remember=remember)
        self._refused(reason, staged.slot.archive_sha256 if staged.slot and staged.slot.archive_sha256 else None)

    def _install(self, bundle: Bundle, model: TFLiteModel, ready: Dict[str, Any]) -> None:
        """Run ``model`` of ``bundle`` from the next inference on (the one running is closed).

        ``ready`` is :func:`~device_agent.inference.fastpath.prepare` of them, computed by the caller before
        anything changed: from here on nothing can fail half-way (model, manifest, fast path and drift window
        change together, between two inferences)."""
        old_model = self.model
        m, cfg = bundle.manifest, self.config.policy
        # the thresholds before the manifest: another thread that sees the new manifest sees its policy too
        self.policy.set_thresholds(
            cfg.confidence_threshold if cfg.confidence_threshold is not None else m.confidence_threshold,
            cfg.margin_threshold if cfg.margin_threshold is not None else m.margin_threshold,
        )
        # the fast path's bound calls of the old interpreter are replaced here: once closed, it can be freed
        self._use_prepared(ready)  # a fresh drift window too: it describes one model, against its reference
        self.model, self.bundle, self.manifest = model, bundle, bundle.manifest
        old_model.close()
        self.stats.latencies_ms.clear()  # telemetry latency_ms describes the model that runs

    # -- shadow runs (update/shadow.py) -------------------------------------
    def _start_shadow(self, staged: Staged) -> None:
        m = staged.bundle.manifest
        try:  # what its promotion would need: a bundle the loop cannot run is refused now, not after its shadow run
            prepare(staged.model, m)
            table, shape = lookup_table(m.preprocessing, staged.model.input_spec)
        except Exception as exc:  # noqa: BLE001 - the running bundle stays, as with a refusal at the swap
            self._refuse_staged(staged, exc)
            return
        cfg = self.config.policy
        threshold = cfg.confidence_threshold if cfg.confidence_threshold is not None else m.confidence_threshold
        self.shadow = _Shadow(staged, table, shape, threshold,
                              ShadowStats(m.model_ref, staged.slot.archive_sha256 if staged.slot else ""))
        log.info("shadow run: %s v%s (sha256 %s...) classifies every input beside %s v%s, which still decides",
                 m.name, m.version, m.sha256[:12], self.manifest.name, self.manifest.version)
        self._telemetry_due = 0.0

    def _shadow_run(self, raw: np.ndarray) -> Optional[tuple]:
        """The candidate on one input: ``(prediction, latency_s)``, or None when it failed (counted; dropped past
        the limit)."""
        sh = self.shadow
        model, m = sh.staged.model, sh.staged.bundle.manifest
        t0 = time.perf_counter()
        try:
            if sh.table is not None and raw.dtype == np.uint8 and raw.shape == sh.shape:
                model.set_raw_input(np.take(sh.table, raw))
                model.invoke()
                scores = model.output()
            else:
                scores = model(preprocess(raw, m.preprocessing))
            shadow_latency = time.perf_counter() - t0  # the span the current model's latency covers, no more
            cand = classify(scores, m.labels, m.output_activation)
        except (InputError, RuntimeError, ValueError, MemoryError) as exc:
            sh.stats.error()
            log.warning("shadow %s v%s failed an input (%s: %s)", m.name, m.version, exc.__class__.__name__,
                        str(exc)[:200])
            if sh.stats.errors > self.config.update.probation_max_errors:
                self._drop_shadow(f"{sh.stats.errors} inputs failed under it (probation_max_errors="
                                  f"{self.config.update.probation_max_errors})")
            return None
        return cand, shadow_latency

    def _shadow_record(self, result: Optional[tuple], pred: Any, low: bool, latency: float) -> None:
        sh = self.shadow
        if result is None or sh is None:
            return
        cand, shadow_latency = result
        sh.stats.record(label=cand.label, confidence=cand.confidence, low=cand.confidence < sh.threshold,
                        latency_s=shadow_latency, current_label=pred.label,
                        current_confidence=pred.confidence, current_low=low, current_latency_s=latency)
        u = self.config.update
        if sh.stats.inferences % _SHADOW_LATENCY_EVERY == 0:  # a candidate too slow for this board slows the loop
            snap = sh.stats.snapshot()
            p95, cur = snap["latency_ms"]["p95"], snap["current_latency_ms"]["p95"]
            if u.probation_latency_ms > 0 and p95 > u.probation_latency_ms:
                self._drop_shadow(f"its p95 latency {p95:.3f} ms is above probation_latency_ms="
                                  f"{u.probation_latency_ms:g}")
            elif u.probation_latency_ratio > 0 and p95 > u.probation_latency_ratio * max(cur, u.probation_latency_floor_ms):
                self._drop_shadow(f"its p95 latency {p95:.3f} ms is {p95 / cur:.1f}x the current model's {cur:.3f} ms "
                                  f"(probation_latency_ratio={u.probation_latency_ratio:g}, "
                                  f"probation_latency_floor_ms={u.probation_latency_floor_ms:g})")

    def _end_shadow(self, why: Any) -> None:
        sh, self.shadow = self.shadow, None
        sh.staged.model.close()
        promoted = isinstance(why, Staged) and sh.staged.slot is not None and why.slot is not None \
            and why.slot.archive_sha256 == sh.staged.slot.archive_sha256
        if not isinstance(why, Staged):  # a Staged one counts its own attempt; the shadow's is forgotten
            self.updater.shadow_ended()
        m = sh.staged.bundle.manifest
        log.info("shadow run of %s v%s ended after %d inferences (agreement %s): %s", m.name, m.version,
                 sh.stats.inferences, sh.stats.snapshot()["agreement"],
                 "promoted" if promoted else "a newer bundle message arrived")
        self._telemetry_due = 0.0

    def _drop_shadow(self, why: str) -> None:
        sh, self.shadow = self.shadow, None
        sh.staged.model.close()
        m = sh.staged.bundle.manifest
        self.updater.shadow_failed(sh.staged.slot, f"failed its shadow run: {why}")
        self.last_update_archive = sh.staged.slot.archive_sha256 if sh.staged.slot else None
        self.last_update_error = (f"shadow candidate {m.name} v{m.version} (sha256 {m.sha256[:12]}...) dropped: {why}; "
                                  f"{self.manifest.name} v{self.manifest.version} runs as before")
        self.stats.error("update")
        log.warning("%s", self.last_update_error)
        self._announce()
