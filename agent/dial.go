package agent

import (
	"os"
	"syscall"
)

// dialUnix connects to a unix stream socket with syscalls, not package
// net: net's cgo DNS resolver would make a binary dynamically linked, and
// loading libc costs more than everything else cmd/granary-run does. A
// unix socket's connect does not block for long (it fails at once when
// nobody listens), so it takes no context. The file is non-blocking, so
// its reads go through the runtime's poller and Close interrupts them.
func dialUnix(path string) (*os.File, error) {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	for {
		err = syscall.Connect(fd, &syscall.SockaddrUnix{Name: path})
		if err != syscall.EINTR {
			break
		}
	}
	if err == nil {
		err = syscall.SetNonblock(fd, true)
	}
	if err != nil {
		syscall.Close(fd)
		return nil, os.NewSyscallError("connect", err)
	}
	return os.NewFile(uintptr(fd), path), nil
}
