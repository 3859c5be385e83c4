"""Discrete-event simulation of one engine under load, on a virtual clock.

The scheduler, block manager, admission and SLO controller are the engine's own classes;
only the model step is replaced by a latency drawn from a step-cost profile fitted to GPU
measurements (`brownout.sim.profile`). `brownout simulate` writes the same run files as
`brownout bench`, so the bench report, tables and plots read a simulated run unchanged.
"""
