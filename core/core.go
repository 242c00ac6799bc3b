package core

import "context"

// PackageManager hands out handlers for packages by ID.
type PackageManager interface {
	// Get returns the handler for the package id. It does no I/O and never
	// fails: an invalid id yields a handler whose methods return an error
	// wrapping ErrInvalidID.
	Get(id string) PackageHandler
}

// PackageHandler is one package of a PackageManager.
type PackageHandler interface {
	// OutputDirectory is the stable path of the package's tree. Builders
	// write into it; dependents may embed it. It is "" for an invalid ID.
	OutputDirectory() string

	// LoggingDirectory is where a build keeps its logs. Logs of a failed
	// build stay there until the next attempt.
	LoggingDirectory() string

	// Build makes the package available. If it is available already, Build
	// returns nil without calling builder. Otherwise it takes the package's
	// exclusive build lock (cluster-wide for a shared implementation), runs
	// builder, which must fill OutputDirectory(), and publishes the result.
	// Callers that ask for the same package at the same time share one
	// attempt: builder runs once however many callers wait. If that attempt
	// fails, the callers that were waiting on it get an error wrapping
	// ErrBuildFailed; later callers try again.
	Build(builder func() error) error

	// TryRemove removes the package if nothing references it and no build
	// holds its lock. It reports false and no error when the package is in
	// use, and ErrPackageNotExist when it is not available.
	TryRemove() (ok bool, err error)

	// IncRef takes a reference that keeps the package from being removed and
	// records the access time. It returns ErrPackageNotExist unless the
	// package is available and complete.
	IncRef() error

	// DecRef releases the newest reference taken by IncRef. Calling it
	// without a held reference is an error wrapping ErrNoRef.
	DecRef() error
}

// ContextHandler is implemented by handlers whose blocking operations can be
// bounded and cancelled by a context. Prefer it when it is available.
type ContextHandler interface {
	PackageHandler

	// BuildContext is Build with a context. The builder receives a context
	// that is cancelled when ctx is, when every caller sharing the attempt
	// has given up, or when the implementation can no longer guarantee the
	// build lock (a lease in doubt). A builder must stop promptly when it is.
	BuildContext(ctx context.Context, builder func(ctx context.Context) error) error

	// TryRemoveContext is TryRemove with a context.
	TryRemoveContext(ctx context.Context) (ok bool, err error)

	// IncRefContext is IncRef with a context.
	IncRefContext(ctx context.Context) error

	// DecRefContext is DecRef with a context.
	DecRefContext(ctx context.Context) error
}
