"""The i8042 keyboard controller, as far as a guest uses it on a server: its
status and command byte, self-test, and the reset line (command 0xFE), which
is how Linux reboots. A reset stops the VM cleanly: the VMM has no firmware to
reboot into, so "reboot" means "the guest asked to be switched off".
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from vmigrate.proto import state_pb2

DATA_PORT, COMMAND_PORT = 0x60, 0x64
STATUS_OBF, STATUS_SYS = 0x01, 0x04

CMD_READ_CB, CMD_WRITE_CB = 0x20, 0x60
CMD_SELF_TEST, CMD_IF_TEST = 0xAA, 0xAB
CMD_WRITE_OUTPUT = 0xD1
CMD_RESET = 0xFE


class I8042:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self.status = STATUS_SYS
        self.command_byte = 0x45     # translate, system flag, keyboard interrupt
        self.output = 0
        self.output_full = False
        self.pending = 0             # a command waiting for its data byte

    def read(self, port: int) -> int:
        with self._lock:
            if port == COMMAND_PORT:
                return self.status | (STATUS_OBF if self.output_full else 0)
            self.output_full = False
            return self.output

    def write(self, port: int, value: int) -> None:
        reset = False
        with self._lock:
            if port == COMMAND_PORT:
                self.pending = 0
                if value == CMD_READ_CB:
                    self._put(self.command_byte)
                elif value in (CMD_WRITE_CB, CMD_WRITE_OUTPUT):
                    self.pending = value
                elif value == CMD_SELF_TEST:
                    self._put(0x55)
                elif value == CMD_IF_TEST:
                    self._put(0x00)
                elif value == CMD_RESET:
                    reset = True
            elif self.pending == CMD_WRITE_CB:
                self.command_byte = value
                self.pending = 0
            elif self.pending == CMD_WRITE_OUTPUT:
                self.pending = 0
                reset = not value & 0x01     # bit 0 low: pulse the CPU reset line
            else:
                self._put(0xFA)              # ACK whatever a keyboard would get
        if reset:
            self._on_reset()

    def _put(self, value: int) -> None:
        self.output, self.output_full = value, True

    def save(self) -> state_pb2.I8042State:
        with self._lock:
            return state_pb2.I8042State(status=self.status, command_byte=self.command_byte,
                                        output_byte=self.output, output_full=self.output_full,
                                        pending_command=self.pending)

    def restore(self, s: state_pb2.I8042State) -> None:
        with self._lock:
            self.status, self.command_byte = s.status, s.command_byte
            self.output, self.output_full = s.output_byte, s.output_full
            self.pending = s.pending_command
