"""A 16550A UART on the first serial port (COM1: ports 0x3f8-0x3ff, IRQ 4).

Transmission is instantaneous (LSR always shows the transmitter empty), so a
guest never needs to poll before writing. Received bytes wait in a FIFO that
travels with the device state, so a character in flight is not lost across a
checkpoint or a migration. The interrupt line follows the 8250 rules a PC
guest expects: it is gated by MCR.OUT2 and reported through IIR.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from vmigrate.proto import state_pb2

COM1_BASE = 0x3F8
COM1_IRQ = 4
RX_CAPACITY = 4096

# registers (offsets), DLAB=0 unless noted
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LCR_DLAB = 0x80
MCR_OUT2, MCR_LOOP = 0x08, 0x10
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08
IIR_NONE, IIR_THRI, IIR_RDI, IIR_RLSI = 0x01, 0x02, 0x04, 0x06
IIR_FIFO_BITS = 0xC0
FCR_ENABLE, FCR_CLEAR_RX = 0x01, 0x02


class Uart:
    def __init__(self, set_irq: Callable[[int], None], on_output: Callable[[bytes], None]) -> None:
        self._set_irq = set_irq
        self._on_output = on_output
        self._lock = threading.Lock()
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr = 0xB0          # DCD | DSR | CTS: a terminal is attached
        self.scr = 0
        self.dll = 12            # 9600 baud until the guest says otherwise
        self.dlm = 0
        self.fcr = 0
        self.rx: deque[int] = deque()
        self.thr_pending = False
        self.irq_level = 0

    # ---- port I/O from vCPU threads
    def read(self, offset: int) -> int:
        with self._lock:
            value = self._read(offset)
            self._update_irq()
            return value

    def write(self, offset: int, value: int) -> None:
        out = None
        with self._lock:
            out = self._write(offset, value & 0xFF)
            self._update_irq()
        if out is not None:
            self._on_output(out)

    def _read(self, off: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if off == RBR_THR_DLL:
            if dlab:
                return self.dll
            if self.rx:
                return self.rx.popleft()
            return 0
        if off == IER_DLM:
            return self.dlm if dlab else self.ier
        if off == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRI:
                self.thr_pending = False     # reading IIR acknowledges THRE
            return iir | (IIR_FIFO_BITS if self.fcr & FCR_ENABLE else 0)
        if off == LCR:
            return self.lcr
        if off == MCR:
            return self.mcr
        if off == LSR:
            lsr = self.lsr | (LSR_DR if self.rx else 0)
            self.lsr &= ~LSR_OE
            return lsr
        if off == MSR:
            if self.mcr & MCR_LOOP:         # loopback: modem outputs feed the inputs
                m = self.mcr
                return (((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) |
                        ((m & 0x08) << 4))
            return self.msr
        return self.scr

    def _write(self, off: int, value: int) -> bytes | None:
        dlab = self.lcr & LCR_DLAB
        if off == RBR_THR_DLL:
            if dlab:
                self.dll = value
                return None
            self.thr_pending = True          # transmitted at once: THR is empty again
            if self.mcr & MCR_LOOP:
                self._push_rx(bytes([value]))
                return None
            return bytes([value])
        if off == IER_DLM:
            if dlab:
                self.dlm = value
            else:
                if value & IER_THRI and not self.ier & IER_THRI:
                    self.thr_pending = True
                self.ier = value & 0x0F
        elif off == IIR_FCR:
            self.fcr = value & 0xC9
            if value & FCR_CLEAR_RX:
                self.rx.clear()
        elif off == LCR:
            self.lcr = value
        elif off == MCR:
            self.mcr = value & 0x1F
        elif off == SCR:
            self.scr = value
        return None

    def _iir(self) -> int:
        if self.ier & IER_RLSI and self.lsr & LSR_OE:
            return IIR_RLSI
        if self.ier & IER_RDI and self.rx:
            return IIR_RDI
        if self.ier & IER_THRI and self.thr_pending:
            return IIR_THRI
        return IIR_NONE

    def _update_irq(self) -> None:
        level = 1 if self._iir() != IIR_NONE and self.mcr & MCR_OUT2 else 0
        if level != self.irq_level:
            self.irq_level = level
            self._set_irq(level)

    def _push_rx(self, data: bytes) -> int:
        room = RX_CAPACITY - len(self.rx)
        self.rx.extend(data[:room])
        if len(data) > room:
            self.lsr |= LSR_OE
        return min(room, len(data))

    # ---- input from the console
    def receive(self, data: bytes) -> int:
        """Queue bytes for the guest; returns how many fit."""
        with self._lock:
            n = self._push_rx(data)
            self._update_irq()
            return n

    # ---- state
    def save(self) -> state_pb2.UartState:
        with self._lock:
            return state_pb2.UartState(
                ier=self.ier, lcr=self.lcr, mcr=self.mcr, lsr=self.lsr, msr=self.msr,
                scr=self.scr, dll=self.dll, dlm=self.dlm, fcr=self.fcr,
                rx_fifo=bytes(self.rx), thr_interrupt_pending=self.thr_pending,
                irq_level=bool(self.irq_level))

    def restore(self, s: state_pb2.UartState) -> None:
        """Load state; the interrupt line's level is already in the restored irqchip."""
        with self._lock:
            self.ier, self.lcr, self.mcr, self.lsr = s.ier, s.lcr, s.mcr, s.lsr
            self.msr, self.scr, self.dll, self.dlm, self.fcr = s.msr, s.scr, s.dll, s.dlm, s.fcr
            self.rx = deque(s.rx_fifo[:RX_CAPACITY])
            self.thr_pending = s.thr_interrupt_pending
            self.irq_level = int(s.irq_level)
