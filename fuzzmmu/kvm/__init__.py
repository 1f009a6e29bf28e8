"""Real KVM as a second machine under test: /dev/kvm driven from Python (``device``), a guest
agent that performs one guest operation at a time (``agent``, ``guest``), and ``KvmMachine``,
which answers the executor as the model does (``machine``; ``target.KVM`` plugs it in,
``support`` says which programs it can run). Needs a usable /dev/kvm; ``KvmUnavailable`` says
why not. Import ``fuzzmmu.kvm.target`` for the target: this package imports nothing itself."""
