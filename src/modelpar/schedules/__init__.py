"""Pipeline schedules as data (`actions`), the one dependency rule of an action (`dependencies`),
the simulator that places the lists in time (`simulate`) and the point-to-point exchange plan
built from them (`p2p`). Pure Python: the planner and the runtime both import it."""
