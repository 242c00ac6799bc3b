package etcdstore

import (
	"fmt"
	"runtime/debug"
)

// PanicError is the error of a builder that panicked. Its message is one
// line; the goroutine stack is kept in Stack for the log (the store logs it
// at error level, with the package ID) rather than in every message that
// quotes the error.
type PanicError struct {
	Value any    // what the builder panicked with
	Stack []byte // the panicking goroutine's stack
}

func (e *PanicError) Error() string { return fmt.Sprintf("builder panicked: %v", e.Value) }

// Unwrap returns the panic value when it is an error, so errors.Is finds
// what the builder panicked with.
func (e *PanicError) Unwrap() error {
	err, _ := e.Value.(error)
	return err
}

// recovered turns a recovered panic value into a *PanicError carrying the
// current stack (call it from the deferred function that recovered).
func recovered(r any) *PanicError {
	return &PanicError{Value: r, Stack: debug.Stack()}
}
