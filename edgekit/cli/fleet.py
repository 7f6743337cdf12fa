"""``edgekit fleet status``: the boards the collector has heard from; ``edgekit fleet push`` / ``rollback``: the
model they run."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    from ..loop.store import DEFAULT_STORE

    p = sub.add_parser("fleet", help="the boards: status, push a bundle, identities (ca, enroll, revoke)")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    cmds = p.add_subparsers(dest="fleet_command", metavar="ACTION")
    st = cmds.add_parser("status", help="a table: last seen, online, model, inferences, low-confidence rate, "
                                        "outbox, dropped, temperature, drift (confidence PSI)")
    st.add_argument("--store", default=DEFAULT_STORE, help=f"sqlite:///path.db or postgresql://... (default {DEFAULT_STORE})")
    st.add_argument("--fleet", help="only this fleet")
    st.add_argument("--stale-after", type=float, default=300.0, metavar="S",
                    help="a board silent this long counts as offline even if its status says online (default 300)")
    st.add_argument("--json", action="store_true", help="one JSON object per device, a line each")
    st.set_defaults(func=_status)

    from device_agent.delivery.protocol import DEFAULT_MAX_BUNDLE_BYTES

    pu = cmds.add_parser(
        "push", help="send a bundle to boards: retained on each board's bundle topic, installed between two inferences",
        description="Publish BUNDLE as the model the boards should run (a retained edgekit.bundle/1 message, QoS 1, "
                    "on edgekit/v1/<fleet>/<device>/bundle). A board that is offline gets it when it connects. "
                    "Boards with [update] trusted_keys run only bundles signed by one of those keys: a signed bundle "
                    "goes as it is, --sign-key signs an unsigned one first, and an unsigned one is refused unless "
                    "--allow-unsigned. Going back to an older bundle is `edgekit fleet rollback`. See docs/protocol.md, "
                    "'Model updates'.")
    pu.add_argument("bundle", metavar="BUNDLE", help="bundle directory (from edgekit convert/retrain) or its .tar.gz")
    pu.add_argument("--sign-key", metavar="KEY",
                    help="sign the bundle with this private key (signing.key of `edgekit keys init`) unless this key "
                         "signed it already")
    pu.add_argument("--allow-unsigned", action="store_true",
                    help="push an unsigned bundle anyway (only boards without [update].trusted_keys run it)")
    from ..fleet.rollout import DEFAULT_STATE

    pu.add_argument("--canary", metavar="N|P%",
                    help="send it to a cohort only: N boards or P%% of the listed ones, chosen deterministically and "
                         "recorded in --state; judge it with `edgekit fleet rollout status` (docs/rollout.md)")
    pu.add_argument("--shadow", action="store_true",
                    help="with --canary: the cohort runs it beside its current model on the same inputs (the current "
                         "one still decides) and reports agreement, confidence and latency of both")
    pu.add_argument("--previous", metavar="DIR",
                    help="with --canary: the bundle the boards run now; `rollout abort` pushes it back (without "
                         "--shadow), `rollout status --store` compares it with the candidate on labelled samples")
    pu.add_argument("--state", default=DEFAULT_STATE, metavar="PATH",
                    help=f"with --canary: the rollout's state file (default {DEFAULT_STATE})")
    _targets(pu, DEFAULT_STORE, DEFAULT_MAX_BUNDLE_BYTES)
    pu.set_defaults(func=_push)

    ro = cmds.add_parser(
        "rollout", help="a canary rollout: status (per board and cohort figures, a verdict), promote, abort",
        description="Judge the candidate a `fleet push --canary` sent to a cohort, from the cohort's retained status "
                    "and telemetry on the broker (each board is asked for fresh telemetry). The verdict: abort if "
                    "failed boards / boards tried is above --abort-rate after --abort-min boards, or (shadow) the "
                    "one-sided Wilson lower bound on disagreement is above --max-disagreement; promote when every "
                    "cohort board succeeded and (shadow) the Wilson upper bound on disagreement over at least "
                    "--min-inferences pooled inferences is at most --max-disagreement; else wait. See docs/rollout.md.")
    ro.set_defaults(func=lambda a: (ro.print_help(), 2)[1])
    racts = ro.add_subparsers(dest="rollout_command", metavar="ACTION")
    for name, helptext in (("status", "per-board and per-cohort figures and the verdict; --auto acts on it"),
                           ("promote", "send the candidate to the rest of the fleet (and install it on a shadow "
                                       "cohort)"),
                           ("abort", "take the candidate back: clear it from a shadow cohort, or push --previous "
                                     "back to a canary cohort")):
        a = racts.add_parser(name, help=helptext, description=helptext)
        a.add_argument("--broker", required=True, help="mqtt://[user:pass@]host:1883 or mqtts://host:8883")
        a.add_argument("--state", default=DEFAULT_STATE, metavar="PATH",
                       help=f"the rollout's state file (default {DEFAULT_STATE})")
        a.add_argument("--timeout", type=float, default=30.0, metavar="S", help="seconds to wait for the broker (default 30)")
        a.add_argument("--protocol", choices=["5", "3.1.1"], default="5", help="MQTT version (default 5)")
        a.add_argument("--ca-file", help="CA certificate for mqtts://")
        a.add_argument("--cert-file", help="client certificate for mqtts://")
        a.add_argument("--key-file", help="client key for mqtts://")
        a.add_argument("--sign-key", metavar="KEY", help="abort of a canary on boards that need signatures: sign the "
                                                         "previous bundle again as a new release")
        a.set_defaults(func=_rollout, rollout_action=name)
        if name == "status":
            a.add_argument("--auto", action="store_true", help="promote or abort by the verdict, and say why")
            a.add_argument("--wait", type=float, default=10.0, metavar="S",
                           help="seconds to wait for every cohort board's telemetry (default 10)")
            a.add_argument("--until-decided", type=float, default=0.0, metavar="S",
                           help="look again until the verdict is promote or abort, for at most S seconds (default 0: "
                                "once)")
            a.add_argument("--json", action="store_true", help="the verdict as one JSON object")
            a.add_argument("--store", metavar="URL",
                           help="the sample store (sqlite:///path.db or postgresql://...): run the current and the "
                                "candidate bundle on its labelled samples, report both accuracies and the exact "
                                "McNemar test, and abort when the candidate is worse")
            a.add_argument("--previous", metavar="DIR",
                           help="with --store: the bundle the boards run now (default: the --previous recorded at "
                                "the push)")
            from ..fleet.rollout import Rule

            r = Rule()
            for flag, typ, default, h in (
                ("--max-disagreement", float, r.max_disagreement, "share of the current model's answers the candidate "
                                                                  "may change"),
                ("--confidence", float, r.confidence, "one-sided confidence of the Wilson bounds"),
                ("--min-inferences", int, r.min_inferences, "pooled shadow inferences before a promotion"),
                ("--min-board-inferences", int, r.min_board_inferences, "shadow inferences before a board counts as "
                                                                        "tried"),
                ("--max-latency-ratio", float, r.max_latency_ratio, "candidate p95 / current p95 on a board"),
                ("--latency-floor-ms", float, r.latency_floor_ms, "the ratio is taken against at least this p95"),
                ("--max-error-rate", float, r.max_error_rate, "inputs the candidate failed / inputs it saw"),
                ("--abort-rate", float, r.abort_rate, "failed boards / boards tried above this aborts"),
                ("--abort-min", int, r.abort_min, "boards tried before the abort rate applies"),
                ("--mcnemar-alpha", float, r.mcnemar_alpha, "with --store: abort when the one-sided exact McNemar p "
                                                            "(candidate worse on labelled samples) is below this"),
                ("--min-labelled", int, r.min_labelled, "with --store: labelled samples McNemar needs; fewer from the "
                                                        "cohort since the start and all the fleet's are used"),
            ):
                a.add_argument(flag, type=typ, default=default, help=f"{h} (default {default:g})")

    rb = cmds.add_parser(
        "rollback", help="send an older bundle back to boards, signed again as a new release",
        description="Roll boards back to BUNDLE: it is signed again in place as a new release (a board never installs "
                    "a release below one it accepted, so going back is a signed act) and pushed like `edgekit fleet "
                    "push`. Boards that still keep it under their state dir reuse it without unpacking.")
    rb.add_argument("bundle", metavar="BUNDLE", help="the bundle directory to go back to")
    rb.add_argument("--sign-key", metavar="KEY", required=True, help="the private key to sign it with (signing.key)")
    rb.add_argument("--release", type=int, metavar="N",
                    help="the new release number (default: one above the key's last)")
    _targets(rb, DEFAULT_STORE, DEFAULT_MAX_BUNDLE_BYTES)
    rb.set_defaults(func=_rollback)

    from .fleet_identity import register as register_identity

    register_identity(cmds)  # ca init|list, enroll, revoke


def _targets(p: argparse.ArgumentParser, default_store: str, default_max: int) -> None:
    """Where a push goes and how: broker, fleet, devices, limits, TLS, dry run."""
    p.add_argument("--broker", required=True, help="mqtt://[user:pass@]host:1883 or mqtts://host:8883")
    p.add_argument("--fleet", required=True, help="the boards' fleet ([device].fleet in their config)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", action="append", metavar="ID", help="a board's device id (repeat for several)")
    who.add_argument("--all-devices", action="store_true", help="every device of the fleet the store has seen")
    p.add_argument("--store", default=default_store, help=f"with --all-devices: the collector's store (default {default_store})")
    p.add_argument("--max-bytes", type=int, default=default_max,
                   help=f"refuse a bundle archive bigger than this (default {default_max}; "
                        "the boards' [update].max_bytes must allow it too)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="seconds to wait for the broker (default 30)")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5", help="MQTT version (default 5)")
    p.add_argument("--ca-file", help="CA certificate for mqtts://")
    p.add_argument("--cert-file", help="client certificate for mqtts://")
    p.add_argument("--key-file", help="client key for mqtts://")
    p.add_argument("--dry-run", action="store_true", help="verify and pack the bundle, print what would be sent "
                                                          "(signs nothing)")


def _status(args: argparse.Namespace) -> int:
    import time

    from ..fleet.status import fleet_status, format_table
    from ..loop.store import open_store

    now = time.time()
    with open_store(args.store) as store:
        rows = fleet_status(store, fleet=args.fleet, stale_after_s=args.stale_after, now=now)
    if args.json:
        for r in rows:
            print(json.dumps(r, sort_keys=True))
    elif not rows:
        print("no devices seen yet; is `edgekit collect` running against the fleet's broker?")
    else:
        print(format_table(rows, now))
    return 0


def _rollout(args: argparse.Namespace) -> int:
    import time

    from ..fleet import rollout as ro

    state = ro.RolloutState.load(args.state)
    if args.rollout_action != "status":
        return _act(args, state, args.rollout_action, f"by hand (`edgekit fleet rollout {args.rollout_action}`)")
    rule = ro.Rule(**{k: getattr(args, k) for k in ro.Rule.__dataclass_fields__})
    deadline = time.monotonic() + args.until_decided

    def labelled():
        if not args.store:
            return None
        from ..fleet.labelled import compare_on_labels
        from ..loop.store import open_store

        with open_store(args.store) as store:
            return compare_on_labels(store, state.fleet, state.cohort, state.started, args.previous or state.previous,
                                     state.candidate["path"], min_labelled=rule.min_labelled)

    while True:
        statuses, tele = ro.observe(args.broker, state.fleet, state.cohort, wait_s=args.wait,
                                    protocol_version=args.protocol, ca_file=args.ca_file, cert_file=args.cert_file,
                                    key_file=args.key_file, timeout=args.timeout)
        verdict = ro.judge(state, statuses, tele, rule, labelled())
        if verdict.decision != "wait" or time.monotonic() >= deadline or state.phase != "canary":
            break
        time.sleep(1.0)
    if args.json:
        print(json.dumps(dict(verdict.to_dict(), phase=state.phase, candidate=state.candidate, shadow=state.shadow),
                         sort_keys=True))
    else:
        print(_format_verdict(state, verdict))
    if args.auto and state.phase == "canary" and verdict.decision in ("promote", "abort"):
        return _act(args, state, verdict.decision, "; ".join(verdict.reasons))
    return 0


def _format_verdict(state, verdict) -> str:
    c = state.candidate
    f = verdict.figures
    lines = [f"rollout of {c['name']} v{c['version']} (archive {c['archive_sha256'][:12]}...) to fleet {state.fleet}: "
             f"{'shadow' if state.shadow else 'canary'} cohort of {len(state.cohort)} ({state.canary}), "
             f"{len(state.rest)} boards after it; phase {state.phase}"]
    head = ("device", "outcome", "inferences", "disagree", "errors", "p95 ms", "current p95", "ratio", "low-conf",
            "conf", "why")

    def fmt(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    body = [(b.device, b.outcome, str(b.inferences), str(b.disagree) if state.shadow else "-", str(b.errors),
             fmt(b.latency_p95_ms), fmt(b.current_p95_ms), fmt(b.latency_ratio),
             fmt(b.low_confidence_rate, ".3f"), fmt(b.confidence_mean, ".3f"), b.why[:80]) for b in verdict.boards]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (head, *body)]
    lines.append(f"cohort: {f['tried']} tried, {f['succeeded']} succeeded, {f['failed']} failed; "
                 + (f"disagreement {f['disagree']}/{f['inferences']}"
                    + (f" = {f['disagreement']:.4f} (Wilson {f['disagreement_lower']:.4f}..{f['disagreement_upper']:.4f})"
                       if f["inferences"] else "") + "; " if state.shadow else "")
                 + f"median p95 ratio {fmt(f['latency_ratio_median'])}; candidate errors {f['errors']}")
    if f.get("labelled"):
        lab = f["labelled"]
        fa = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"labelled samples ({lab['samples']}): {lab['n']} classified by both, {lab['skipped']} skipped; "
                     f"accuracy current {lab['current']} {fa(lab['current_accuracy'])}, candidate {lab['candidate']} "
                     f"{fa(lab['candidate_accuracy'])}; only current right {lab['b']}, only candidate right "
                     f"{lab['c']}; exact McNemar p (candidate worse) {lab['p_worse']:.3g}, two-sided "
                     f"{lab['p_two_sided']:.3g}")
    lines.append(f"rule: {f['rule']}")
    lines.append(f"verdict: {verdict.decision.upper()}: " + "; ".join(verdict.reasons))
    return "\n".join(lines)


def _act(args: argparse.Namespace, state, action: str, why: str) -> int:
    """Promote or abort the rollout in ``args.state``; print what was sent and why."""
    from ..errors import EdgekitError
    from ..fleet.push import bundle_message, push_bundle, sign_for_push

    if state.phase != "canary":
        raise EdgekitError(f"the rollout in {args.state} is already {state.phase}; start a new one with "
                           "`edgekit fleet push BUNDLE --canary N`")
    c = state.candidate
    kw = dict(broker_url=args.broker, fleet=state.fleet, timeout=args.timeout, protocol_version=args.protocol,
              ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
    if action == "promote":
        targets = state.rest + (state.cohort if state.shadow else [])
        _, data = bundle_message(c["path"])
        if json.loads(data)["archive_sha256"] != c["archive_sha256"]:
            raise EdgekitError(f"the candidate {c['path']} changed since the canary push (another archive); start a "
                               "new rollout")
        results = push_bundle(data, devices=targets, **kw) if targets else []
        what = f"{c['name']} v{c['version']} to {len(targets)} boards"
    elif state.shadow:
        targets = state.cohort
        results = push_bundle(b"", devices=targets, **kw)  # clears the retained candidate: the shadow runs end
        what = f"cleared the shadow candidate from {len(targets)} cohort boards"
    else:
        if not state.previous:
            raise EdgekitError("this canary rollout recorded no --previous bundle to push back; push the bundle the "
                               "fleet ran with `edgekit fleet rollback DIR --device ...` (boards that failed the "
                               "candidate's probation are back on it already)")
        targets = state.cohort
        signed = sign_for_push(state.previous, key=args.sign_key, allow_unsigned=True, resign=bool(args.sign_key))
        _, data = bundle_message(state.previous)
        results = push_bundle(data, devices=targets, **kw)
        what = f"pushed the previous bundle {state.previous} ({signed}) back to {len(targets)} cohort boards"
    for r in results:
        if not r.ok:
            print(f"FAILED {r.topic}: {r.detail}")
    ok = all(r.ok for r in results)
    state.phase = "promoted" if action == "promote" else "aborted"
    state.note(action, why)
    state.save(args.state)
    print(f"{action.upper()}: {what}; why: {why}")
    return 0 if ok else 1


def _rollback(args: argparse.Namespace) -> int:
    return _push(args, resign=True)


def _push(args: argparse.Namespace, resign: bool = False) -> int:
    from device_agent.delivery.protocol import now as protocol_now

    from ..errors import EdgekitError
    from ..fleet.push import bundle_message, push_bundle, sign_for_push
    from ..fleet.status import fleet_status
    from ..loop.store import open_store

    signed = sign_for_push(args.bundle, key=args.sign_key, allow_unsigned=getattr(args, "allow_unsigned", False),
                           resign=resign, release=getattr(args, "release", None), dry_run=args.dry_run)
    payload, data = bundle_message(args.bundle, max_bytes=args.max_bytes)
    if args.all_devices:
        with open_store(args.store) as store:
            devices = [r["device"] for r in fleet_status(store, fleet=args.fleet)]
        if not devices:
            raise EdgekitError(f"the store {args.store} has seen no device in fleet {args.fleet!r}; "
                               "name them with --device ID, or run `edgekit collect` first")
    else:
        devices = list(dict.fromkeys(args.device))
    what = (f"{payload['name']} v{payload['version']} (model sha256 {payload['sha256'][:12]}..., "
            f"{payload['size']:,} bytes, {signed})")
    canary = getattr(args, "canary", None)
    if getattr(args, "shadow", False) and not canary:
        raise EdgekitError("--shadow goes with --canary N|P%: a shadow run is judged on a cohort first")
    state = None
    if canary:
        from pathlib import Path

        from ..fleet.rollout import RolloutState, choose_cohort

        if Path(args.state).exists() and not args.dry_run:
            running = RolloutState.load(args.state)
            if running.phase == "canary":
                raise EdgekitError(f"a rollout of {running.candidate.get('name')} v{running.candidate.get('version')} "
                                   f"is still in its canary in {args.state}: promote or abort it first (`edgekit fleet "
                                   "rollout promote|abort`), or pass another --state")
        cohort = choose_cohort(devices, canary, payload["archive_sha256"])
        rest = [d for d in sorted(set(devices)) if d not in cohort]
        if args.previous:
            bundle_message(args.previous, max_bytes=args.max_bytes)  # an abort must be able to push it
        state = RolloutState(fleet=args.fleet, candidate={k: payload[k] for k in ("name", "version", "sha256",
                                                                                  "archive_sha256")},
                             cohort=cohort, rest=rest, shadow=bool(args.shadow), canary=str(canary),
                             previous=str(Path(args.previous).resolve()) if args.previous else None,
                             started=protocol_now())
        state.candidate["path"] = str(Path(args.bundle).resolve())
        state.note("canary", f"cohort of {len(cohort)} chosen by sha256(archive sha256/device) from {len(set(devices))}")
        if args.shadow:
            payload = dict(payload, shadow=True)
            data = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        print(f"canary cohort ({'shadow' if args.shadow else 'installs it'}): {', '.join(cohort)}; after it: "
              f"{', '.join(rest) or 'none'}")
        devices = cohort
    if args.dry_run:
        from device_agent.delivery.protocol import topic

        for d in devices:
            print(f"would push {what} to {topic(args.fleet, d, 'bundle')} (retained, QoS 1)")
        return 0
    results = push_bundle(data, broker_url=args.broker, fleet=args.fleet, devices=devices, timeout=args.timeout,
                          protocol_version=args.protocol, ca_file=args.ca_file, cert_file=args.cert_file,
                          key_file=args.key_file)
    for r in results:
        print(f"{'pushed' if r.ok else 'FAILED'} {what} to {r.topic}: {r.detail}")
    if state is not None:
        print(f"rollout state: {state.save(args.state)}; next: `edgekit fleet rollout status --broker ... --state "
              f"{args.state}`")
    return 0 if all(r.ok for r in results) else 1
