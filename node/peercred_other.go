//go:build !linux

package node

import (
	"errors"
	"net"
)

// peerCred is only implemented on Linux; elsewhere holders show uid -1 and
// pid 0.
func peerCred(*net.UnixConn) (uid, pid int, err error) {
	return -1, 0, errors.New("SO_PEERCRED is only available on Linux")
}

// killGroup is only implemented on Linux.
func killGroup(int) error { return errors.New("killing a process group is only implemented on Linux") }
