package cli

import (
	"errors"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/internal/jobrun"
)

// The command line's exit codes and error declarations. Messages read as
// core/errors.go says; Message puts the one "granary: " in front and
// plainErr (messages.go) says the errors people meet in plain words.

// Exit codes (jobrun's, shared with cmd/granary-run).
const (
	ExitOK       = jobrun.ExitOK       // success
	ExitError    = jobrun.ExitError    // any other failure
	ExitUsage    = jobrun.ExitUsage    // bad command line or configuration
	ExitNotExist = jobrun.ExitNotExist // the package does not exist (or is invalidated)
	// ExitNotAllowed: the local node refused a privileged operation (rm,
	// pin, unpin, invalidate) to a caller outside its admin group.
	ExitNotAllowed = 4
)

// ExitErr carries an exit code. A nil Err means the reason was already
// printed (or there is none to print, as when `run` passes on its child's
// code).
type ExitErr = jobrun.ExitErr

// ErrUsage is wrapped by every command-line error.
var ErrUsage = errors.New("usage")

// ExitCode maps an error of Run to the process exit code: 0 for nil, an
// ExitErr's own code, 2 for usage and configuration errors, 3 when a
// package does not exist, 4 when the local node refused a privileged
// operation, 1 otherwise.
func ExitCode(err error) int {
	var ee *ExitErr
	switch {
	case err == nil:
		return ExitOK
	case errors.As(err, &ee):
		return ee.Code
	case errors.Is(err, ErrUsage), errors.Is(err, core.ErrInvalidID):
		return ExitUsage
	case errors.Is(err, core.ErrPackageNotExist):
		return ExitNotExist
	case errors.Is(err, agent.ErrNotAllowed):
		return ExitNotAllowed
	}
	return ExitError
}

// errDescribed ends a command run for its flags only (env.describe).
var errDescribed = errors.New("flags described")

// startError is the error of a builder that could not be started (not
// found, not executable): `build` exits 127 for it, as `run` does.
type startError struct{ err error }

func (e *startError) Error() string { return "cannot start builder: " + e.err.Error() }
func (e *startError) Unwrap() error { return e.err }
