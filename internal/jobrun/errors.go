package jobrun

import (
	"errors"
	"fmt"

	"github.com/granary-build/granary/core"
)

// The exit codes and errors of a job's run, shared by the full CLI and
// granary-run. Messages read as core/errors.go says; these are the
// program's own, so they start with "granary: ".

// Exit codes of the granary commands.
const (
	ExitOK       = 0 // success
	ExitError    = 1 // any other failure
	ExitUsage    = 2 // bad command line or configuration
	ExitNotExist = 3 // the package does not exist
)

// ExitErr carries an exit code. A nil Err means the reason was already
// printed (or there is none to print, as when `run` passes on its child's
// code).
type ExitErr struct {
	Code int
	Err  error
}

// Error returns the reason, or the exit status when there is none.
func (e *ExitErr) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("exit status %d", e.Code)
	}
	return e.Err.Error()
}

// Unwrap returns the reason.
func (e *ExitErr) Unwrap() error { return e.Err }

// NotExist is `run`'s error for a package that is neither available nor
// being built.
func NotExist(id string) error {
	return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: package %q does not exist (and no build of it is in progress); build it first: granary build %s -- CMD", id, id)}
}

// NotAvailable is `run`'s error for a reference refused with err (which
// wraps core.ErrPackageNotExist): the store's own words for an invalidated
// package (who invalidated it, when and why), else NotExist's. Its message
// starts with "granary: " as NotExist's does, for granary-run prints it as
// it is.
func NotAvailable(id string, err error) error {
	if errors.Is(err, core.ErrInvalidated) {
		return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: %w", err)}
	}
	return NotExist(id)
}
