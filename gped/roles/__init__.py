"""The roles of a distributed run, one module each (DESIGN §3).

Each role is a class that takes its channel(s) and model from outside, so tests can drive its
``step()``/``handle()`` without a network; each module's ``run(config, ...)`` alone opens sockets,
installs signal handlers and picks the device.
"""
