"""Pipeline point-to-point plan for backends that match messages in posting order (NCCL).

NCCL ignores tags. Between two ranks the k-th send matches the k-th receive, and every
operation a rank posts to a peer runs on one stream in posting order, so a receive posted ahead
blocks the sends behind it, and two ranks that each post a receive before their send wait for
each other forever. Megatron-LM (`p2p_communication._communicate`) therefore issues the send a
rank owes its neighbour together with the receive it expects from it as ONE `batch_isend_irecv`
group, and `torch.distributed.pipelining` (`PipelineScheduleMulti`, `_batch_p2p`) does the same
per time step of a lockstep table: a rank's batch holds the sends of the action it ran at step t
and the receives of what its neighbours produced at step t.

This module builds that plan from any set of per-rank action lists
(`schedules.actions.build_schedule`), with the dependencies of `schedules.dependencies`:

1. Lockstep rounds (`lockstep_rounds`): list scheduling with unit durations, each rank in list
   order: round(a) = max(round of the previous action on its rank, round of the action on another
   rank that produces its input) + 1. Rounds exist iff the lists are deadlock-free
   (`schedules.simulate.simulate`, same dependencies); otherwise PipelineDeadlock.
2. Exchange t of rank r (`exchange_programs`): sends = the message r's round-t action produces
   for another rank; receives = the messages the other ranks' round-t actions produce for r. A
   rank's program is its actions and exchanges by round, an exchange right after the action of
   its round.

Correct by construction, even if every send blocked until its receive is posted and every
exchange blocked its rank until all of its operations completed: by induction on t, all
exchanges of rounds < t have completed, so every round-t action has its input (produced at an
earlier round) and every rank reaches its exchange t, whose operations all have their
counterparts in the peers' exchange t. A rank's action produces at most one message, so an
exchange holds at most one message per (peer, direction), and both sides list a pair's messages
in round order: the k-th send always meets the k-th receive, with no tags at all.
`check_exchange_programs` replays the programs under those strict (rendezvous) semantics and
verifies both properties; the executor runs it when it is built.

Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from modelpar.schedules.actions import Action
from modelpar.schedules.dependencies import Message, PipelineDeadlock, chunk_needs, key_of, produces, receives

P2P_MODES = ("tagged", "batched")
"""How the executor moves pipeline messages: gloo's tag matching, or this module's batched exchanges."""


@dataclass(frozen=True)
class Exchange:
    """One batch_isend_irecv group of a rank: what it sends and receives after lockstep round `round`."""

    round: int
    sends: tuple[Message, ...]
    recvs: tuple[Message, ...]


Step = Union[int, Exchange]  # a program step: the index of an action in the rank's list, or an exchange


def _num_chunks(actions: Sequence[Sequence[Action]]) -> int:
    return 1 + max((a.chunk for row in actions for a in row), default=0)


def lockstep_rounds(actions: Sequence[Sequence[Action]]) -> list[list[int]]:
    """Per rank, the lockstep round of each action (unit-duration list schedule, see module doc).

    Raises PipelineDeadlock naming each stuck rank and the action it waits at."""
    num_stages = len(actions)
    table = chunk_needs(num_stages, _num_chunks(actions))
    rounds: list[list[int]] = [[-1] * len(row) for row in actions]
    position, previous_round = [0] * num_stages, [-1] * num_stages
    done: dict[tuple[str, int, int], int] = {}  # (kind, global stage, micro-batch) -> round
    waiters: dict[tuple[str, int, int], list[int]] = {}
    ready = list(range(num_stages))
    while ready:
        rank = ready.pop()
        row = actions[rank]
        while position[rank] < len(row):
            action = row[position[rank]]
            needed = [(kind, stage, action.micro_batch) for kind, stage, _ in table[rank, action.kind, action.chunk]]
            missing = next((key for key in needed if key not in done), None)
            if missing is not None:
                waiters.setdefault(missing, []).append(rank)
                break
            this_round = max([previous_round[rank]] + [done[key] for key in needed]) + 1
            rounds[rank][position[rank]] = previous_round[rank] = this_round
            key = key_of(action, rank, num_stages)
            done[key] = this_round
            ready.extend(waiters.pop(key, []))
            position[rank] += 1
    stuck = [rank for rank in range(num_stages) if position[rank] < len(actions[rank])]
    if stuck:
        raise PipelineDeadlock("the pipeline action lists deadlock: " + "; ".join(
            f"rank {rank} waits at {actions[rank][position[rank]]}" for rank in stuck[:8]))
    return rounds


def exchange_programs(actions: Sequence[Sequence[Action]]) -> list[list[Step]]:
    """Per rank, its program: action indices and `Exchange`s, in lockstep-round order (module doc)."""
    num_stages = len(actions)
    num_global = num_stages * _num_chunks(actions)
    rounds = lockstep_rounds(actions)
    sends: list[dict[int, list[Message]]] = [{} for _ in actions]
    recvs: list[dict[int, list[Message]]] = [{} for _ in actions]
    for rank, row in enumerate(actions):
        for action, this_round in zip(row, rounds[rank]):
            message = produces(action, rank, num_stages, num_global)
            if message is not None:
                sends[rank].setdefault(this_round, []).append(message)
                recvs[message.receiver].setdefault(this_round, []).append(message)
    programs: list[list[Step]] = []
    for rank, row in enumerate(actions):
        action_at = {this_round: index for index, this_round in enumerate(rounds[rank])}
        program: list[Step] = []
        for this_round in sorted(set(action_at) | set(recvs[rank])):
            if this_round in action_at:
                program.append(action_at[this_round])
            out, into = sends[rank].get(this_round, []), recvs[rank].get(this_round, [])
            if out or into:
                program.append(Exchange(this_round, tuple(out), tuple(sorted(into, key=lambda m: m.sender))))
        programs.append(program)
    return programs


def check_exchange_programs(actions: Sequence[Sequence[Action]], programs: Sequence[Sequence[Step]]) -> None:
    """Replay `programs` under the strictest semantics a backend may have and raise
    PipelineDeadlock if they could hang or deliver a wrong tensor.

    Semantics: a rank runs its program in order; an action needs its input message already
    received and makes its output message available; at an exchange the rank stops until every
    operation of the exchange has met its counterpart, the peer standing at the exchange that
    holds it (rendezvous, as NCCL sends are, and gloo's); the k-th send from A to B meets the k-th
    receive on B from A, whatever the messages are (no tags), and must carry the message that
    receive expects. Every message must be sent after it is produced and consumed after it arrives."""
    num_stages = len(actions)
    num_global = num_stages * _num_chunks(actions)
    # (sender, receiver, k) -> the message that the k-th send / receive of the pair carries, and
    # for every operation of every exchange its pair index
    sent_as: dict[tuple[int, int, int], Message] = {}
    received_as: dict[tuple[int, int, int], Message] = {}
    operations: list[list[list[tuple[str, tuple[int, int, int]]]]] = []  # rank -> step -> ops
    for rank, program in enumerate(programs):
        counts: dict[tuple[str, int], int] = {}
        steps = []
        for step in program:
            ops = []
            if isinstance(step, Exchange):
                for direction, messages, table in (("send", step.sends, sent_as), ("recv", step.recvs, received_as)):
                    for message in messages:
                        peer = message.receiver if direction == "send" else message.sender
                        k = counts.get((direction, peer), 0)
                        counts[(direction, peer)] = k + 1
                        pair = (rank, peer, k) if direction == "send" else (peer, rank, k)
                        table[pair] = message
                        ops.append((direction, pair))
            steps.append(ops)
        operations.append(steps)
    for pair in sorted(set(sent_as) | set(received_as)):
        if sent_as.get(pair) != received_as.get(pair):
            raise PipelineDeadlock(f"rank {pair[0]} -> rank {pair[1]}, message {pair[2]}: sent as "
                                   f"{sent_as.get(pair, 'nothing')} but received as {received_as.get(pair, 'nothing')}")

    position = [0] * num_stages
    available: list[set] = [set() for _ in range(num_stages)]  # produced, not yet sent
    inbox: list[set] = [set() for _ in range(num_stages)]  # received, not yet consumed
    completed: set[tuple[str, tuple[int, int, int]]] = set()
    progress = True
    while progress:
        progress = False
        for rank, program in enumerate(programs):  # run actions up to the next exchange
            while position[rank] < len(program) and not isinstance(program[position[rank]], Exchange):
                action = actions[rank][program[position[rank]]]
                needed = receives(action, rank, num_stages, num_global)
                if needed is not None:
                    if needed.key not in inbox[rank]:
                        break
                    inbox[rank].remove(needed.key)
                produced = produces(action, rank, num_stages, num_global)
                if produced is not None:
                    available[rank].add(produced.key)
                position[rank] += 1
                progress = True
        standing = {}  # (direction, pair) -> rank standing at an exchange holding it
        for rank, program in enumerate(programs):
            if position[rank] < len(program) and isinstance(program[position[rank]], Exchange):
                for operation in operations[rank][position[rank]]:
                    standing[operation] = rank
        for (direction, pair), rank in standing.items():
            counterpart = ("recv" if direction == "send" else "send", pair)
            if (direction, pair) not in completed and counterpart in standing:
                completed.update({(direction, pair), counterpart})
        for rank, program in enumerate(programs):
            if position[rank] < len(program) and isinstance(program[position[rank]], Exchange):
                ops = operations[rank][position[rank]]
                if all(op in completed for op in ops):
                    exchange = program[position[rank]]
                    for message in exchange.sends:
                        if message.key not in available[rank]:
                            raise PipelineDeadlock(f"rank {rank} sends {message} before computing it")
                        available[rank].remove(message.key)
                    inbox[rank].update(message.key for message in exchange.recvs)
                    position[rank] += 1
                    progress = True
    stuck = [rank for rank in range(num_stages) if position[rank] < len(programs[rank])]
    if stuck:
        raise PipelineDeadlock("the exchange programs hang: " + "; ".join(
            f"rank {rank} at {_describe_step(actions[rank], programs[rank][position[rank]])}" for rank in stuck[:8]))
    leftovers = [rank for rank in range(num_stages) if available[rank] or inbox[rank]]
    if leftovers:
        rank = leftovers[0]
        raise PipelineDeadlock(f"rank {rank}: messages produced but never sent {sorted(available[rank])[:3]}, "
                               f"or received but never used {sorted(inbox[rank])[:3]}")


def _describe_step(row: Sequence[Action], step: Step) -> str:
    if isinstance(step, Exchange):
        return (f"the exchange of round {step.round} (sends: {', '.join(map(str, step.sends)) or 'none'}; "
                f"receives: {', '.join(map(str, step.recvs)) or 'none'})")
    return str(row[step])
