# Shortcuts for the README's commands. Each target sets the machine up first
# (tools/setup, idempotent); the tests and the demo need root, so they run under sudo
# when make does not (as in the Vagrant VM: `vagrant ssh -c 'cd /vagrant && make test'`).
# Extra arguments go in ARGS, e.g. `make test ARGS='-m "not slow"'`.

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: test demo setup vm-test

test:
	$(SUDO) tools/run test $(ARGS)

demo:
	$(SUDO) tools/run demo $(ARGS)

setup:
	$(SUDO) tools/setup

vm-test:
	$(SUDO) tools/vm-test $(ARGS)
