"""Real KVM as a second machine under test: /dev/kvm driven from Python (``device``), a guest
agent that performs one guest operation at a time (``agent``, ``guest``), VMs prepared and reset
in place between programs (``pool``), and ``KvmMachine``, which answers the executor as the model
does (``machine``; ``target.KVM``, a fresh VM per program, and ``target.KVM_POOLED``, a VM of the
process's pool, plug it in; ``support`` says which programs it can run). Needs a usable
/dev/kvm; ``KvmUnavailable`` says why not. Import ``fuzzmmu.kvm.target`` for the targets: this
package imports nothing itself."""
