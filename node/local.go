package node

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/granary-build/granary/etcdstore"
)

// Local describes the local node of a state directory, as written to
// <state>/node.json when it is ready.
type Local struct {
	PID      int       `json:"pid"`
	Socket   string    `json:"socket"`
	Agent    string    `json:"agent,omitempty"` // the local API socket
	StateDir string    `json:"state_dir"`
	Root     string    `json:"root"`
	Metrics  string    `json:"metrics,omitempty"`
	Started  time.Time `json:"started"`
	// CreatedRoot: the node created the shared root directory when it
	// started (the prefix had none), which the CLI that started it says.
	CreatedRoot bool `json:"created_root,omitempty"`
}

// Files in the state directory.
const (
	infoFile = "node.json"
	// LockFile is held (flock) by the running local node for its lifetime.
	LockFile = "node.lock"
	// StartLockFile serialises the CLI's auto-start of the local node.
	StartLockFile = "start.lock"
	// LogFile receives the output of an auto-started node.
	LogFile = "node.log"
)

// ReadLocal returns the local node of stateDir if its socket accepts
// connections, and ErrNoLocalNode otherwise.
func ReadLocal(stateDir string) (Local, error) {
	var l Local
	b, err := os.ReadFile(filepath.Join(stateDir, infoFile))
	if err != nil {
		return l, fmt.Errorf("%w (state dir %s)", ErrNoLocalNode, stateDir)
	}
	if err := json.Unmarshal(b, &l); err != nil {
		return l, fmt.Errorf("%w (state dir %s: corrupt %s)", ErrNoLocalNode, stateDir, infoFile)
	}
	if !SocketAlive(l.Socket) {
		return l, fmt.Errorf("%w (state dir %s; stale %s of pid %d)", ErrNoLocalNode, stateDir, infoFile, l.PID)
	}
	return l, nil
}

// SocketAlive reports whether a server accepts connections on the unix
// socket path.
func SocketAlive(path string) bool {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func writeLocal(l Local) error {
	b, _ := json.MarshalIndent(l, "", "  ")
	return writeStateFile(filepath.Join(l.StateDir, infoFile), append(b, '\n'), 0o644)
}

// writeStateFile replaces path with b whole (a reader sees the old file or
// the new one, never part of it).
func writeStateFile(path string, b []byte, perm os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, perm); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func removeLocal(stateDir string) { os.Remove(filepath.Join(stateDir, infoFile)) }

// StartFailure is why a node of a state directory could not start, as a
// code a program can act on (the CLI that started the node reads it
// instead of the node's log): <state>/start-failure.json, written by New
// when it fails.
type StartFailure struct {
	Code string `json:"code"` // StartFailForeignCluster, or StartFailOther
	Err  string `json:"err"`
	PID  int    `json:"pid"` // the process that failed
}

// Start failure codes.
const (
	// StartFailForeignCluster: the root is bound to another etcd cluster
	// or prefix (etcdstore.ErrForeignCluster).
	StartFailForeignCluster = "foreign-cluster"
	// StartFailOther: any other failure; Err says what.
	StartFailOther = "other"
)

const startFailureFile = "start-failure.json"

// recordStartFailure writes why New failed; it is best effort (the error
// is New's to return either way).
func recordStartFailure(stateDir string, err error) {
	if stateDir == "" {
		return
	}
	f := StartFailure{Code: StartFailOther, Err: err.Error(), PID: os.Getpid()}
	if errors.Is(err, etcdstore.ErrForeignCluster) {
		f.Code = StartFailForeignCluster
	}
	if b, jerr := json.Marshal(f); jerr == nil {
		os.WriteFile(filepath.Join(stateDir, startFailureFile), b, 0o644) //nolint:errcheck // best effort
	}
}

// ReadStartFailure returns why the node of stateDir run as process pid
// could not start, if it recorded it.
func ReadStartFailure(stateDir string, pid int) (StartFailure, bool) {
	var f StartFailure
	b, err := os.ReadFile(filepath.Join(stateDir, startFailureFile))
	if err != nil || json.Unmarshal(b, &f) != nil || f.PID != pid {
		return StartFailure{}, false
	}
	return f, true
}
