"""A swarm peer in its own process (and process group), driven by the tests over stdin/stdout.

Usage: python peer_worker.py '<json options>'. Options: initial_peers (list), run_id, config (dict of
SwarmConfig fields), template (name -> shape), and at most one fault to inject:
- stall_marker (path): on entering an all-reduce, write this file and freeze the averager, so that the
  test can SIGKILL the peer mid-all-reduce (with stall_armed (path): only while that file exists);
- pause_marker (path): on entering the first all-reduce, write the averager's pid to this file and
  hold its event loop for `pause_hold_s`, so that the test can SIGSTOP the averager mid-all-reduce;
- fail_own_side_once (bool): the first all-reduce that completes cleanly fails on this member's side
  only, as a reducer timeout seen by one member alone would.
aggregation (dict of AggregationConfig fields) sets the reducers' rule.
Commands, one JSON object per stdin line: {"cmd": "fuse", "iteration", "weight", "deadline", "fill"
(every body value) or "seed" (a random body), optional "plan" (members, member, group_size: Moshpit
rounds), "return_body"} / {"cmd": "exit"}. Replies are one JSON line each, prefixed "@@ "; a fuse reply
holds the status, attempts, members, rounds and (when OK) the averaged body's min and max (and its
values, flattened in name order, with return_body).
"""

from __future__ import annotations

import json
import os
import sys
import time


def reply(obj) -> None:
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    options = json.loads(sys.argv[1])
    import torch

    from p2pcold.config import AggregationConfig, SwarmConfig
    from p2pcold.swarm import BodyAverager, start_dht, visible_maddrs
    from p2pcold.swarm import swarm_averager
    from p2pcold.swarm.moshpit import plan_rounds

    if options.get("stall_marker"):
        marker = options["stall_marker"]
        original = swarm_averager._SwarmAverager._run_allreduce_inplace_

        armed = options.get("stall_armed")

        async def stalling(self, tensors, group_info, group_id=None, **kwargs):
            if armed and not os.path.exists(armed):
                return await original(self, tensors, group_info, group_id=group_id, **kwargs)
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(600)  # freezes this peer's averager event loop; the test kills the process group
            return await original(self, tensors, group_info, group_id=group_id, **kwargs)

        swarm_averager._SwarmAverager._run_allreduce_inplace_ = stalling

    if options.get("pause_marker"):
        marker, hold_s = options["pause_marker"], options.get("pause_hold_s", 1.0)
        original = swarm_averager._SwarmAverager._run_allreduce_inplace_

        async def pausing(self, tensors, group_info, group_id=None, **kwargs):
            if not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(hold_s)  # blocks the event loop: the test stops the process meanwhile
            return await original(self, tensors, group_info, group_id=group_id, **kwargs)

        swarm_averager._SwarmAverager._run_allreduce_inplace_ = pausing

    if options.get("fail_own_side_once"):
        original_reduce = swarm_averager._SwarmAverager._reduce
        failed = []

        async def failing_once(self, *args, **kwargs):
            await original_reduce(self, *args, **kwargs)
            if not failed:
                failed.append(True)
                injected = "injected: a reducer timed out on this member's side only"
                raise swarm_averager.AllreduceException(injected)

        swarm_averager._SwarmAverager._reduce = failing_once

    config = SwarmConfig(**options.get("config", {}))
    dht = start_dht(config, options.get("initial_peers", []))
    template = {name: torch.zeros(shape) for name, shape in options["template"].items()}
    aggregation = AggregationConfig(**options.get("aggregation", {}))
    averager = BodyAverager(dht, options["run_id"], template, config, aggregation=aggregation)
    reply({"ready": True, "peer_id": averager.peer_id, "maddrs": visible_maddrs(dht)})
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "exit":
            break
        if command["cmd"] == "fuse":
            if "seed" in command:
                generator = torch.Generator().manual_seed(command["seed"])
                body = {name: torch.randn(tensor.shape, generator=generator) for name, tensor in template.items()}
            else:
                body = {name: torch.full_like(tensor, command["fill"]) for name, tensor in template.items()}
            plan = command.get("plan")
            plan = plan and plan_rounds(plan["members"], plan["member"], plan["group_size"])
            result = averager.fuse(body, command["iteration"], command["weight"], command["deadline"], plan=plan)
            summary = {"status": result.status.value, "group_size": result.group_size, "reason": result.reason}
            summary.update(attempts=result.attempts, members=sorted(result.members), rounds=result.rounds)
            if result.ok:
                values = torch.cat([result.averaged[name].flatten() for name in sorted(result.averaged)])
                summary.update(min=float(values.min()), max=float(values.max()))
                if command.get("return_body"):
                    summary.update(body=values.tolist())
            reply(summary)
    averager.shutdown()
    reply({"bye": True})


if __name__ == "__main__":
    main()
