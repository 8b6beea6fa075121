"""``disagg plan``: DistServe's placement search, from measured node rates.

How many prefill and decode nodes (and which TP each) serve a trace at a target
rate within its SLOs at the least compute? Each candidate deployment is played
through a discrete-event simulation of the shaped trace, and its goodput (the
highest rate at which enough requests meet both SLOs) found by bisection.

    profile.py   node rates: a JSON profile or a router's /metrics; TP / core scaling
    simulate.py  the discrete-event simulation of one deployment serving one workload
    search.py    candidate deployments, goodput by bisection, the recommendation
    command.py   the flags, the trace → workload step, the table and the JSON

Import each name from its module.
"""
