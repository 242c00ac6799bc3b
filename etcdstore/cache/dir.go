package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// NewDir returns a cache kept in the directory base (for example a second
// mount, or a FUSE-mounted bucket), which must exist. Objects are written to
// a temporary file in base, flushed with fsync and renamed into place, so a
// reader sees the old object or the new one, never a partial one.
func NewDir(base string, opts ...Option) (*Remote, error) {
	o, err := newOptions(opts)
	if err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(base)
	if err != nil {
		return nil, fmt.Errorf("cache directory %q: %w", base, err)
	}
	if fi, err := os.Stat(abs); err != nil {
		return nil, fmt.Errorf("cache directory %q: %w", base, err)
	} else if !fi.IsDir() {
		return nil, fmt.Errorf("cache directory %s is not a directory", abs)
	}
	return newRemote(dirBackend(abs), o), nil
}

type dirBackend string

func (d dirBackend) String() string { return string(d) }

func (d dirBackend) close() {}

func (d dirBackend) path(name string) string { return filepath.Join(string(d), name) }

func (d dirBackend) open(ctx context.Context, name string) (io.ReadCloser, error) {
	f, err := os.Open(d.path(name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, errNotFound
	}
	if err != nil {
		return nil, err
	}
	return &ctxReader{ctx: ctx, f: f}, nil
}

func (d dirBackend) exists(ctx context.Context, name string) (bool, error) {
	_, err := os.Stat(d.path(name))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

func (d dirBackend) write(ctx context.Context, name string, fill func(io.Writer) error) error {
	tmp, err := os.CreateTemp(string(d), "."+name+".tmp*")
	if err != nil {
		return err
	}
	err = fill(&ctxWriter{ctx: ctx, w: tmp})
	if err == nil {
		err = tmp.Chmod(0o644)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), d.path(name))
	}
	if err != nil {
		os.Remove(tmp.Name())
		return err
	}
	// Make the rename itself durable.
	if dir, err := os.Open(string(d)); err == nil {
		dir.Sync() //nolint:errcheck // some file systems (FUSE) cannot sync a directory
		dir.Close()
	}
	return nil
}

// ctxReader and ctxWriter end a local transfer when ctx ends.
type ctxReader struct {
	ctx context.Context
	f   *os.File
}

func (r *ctxReader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.f.Read(p)
}

func (r *ctxReader) Close() error { return r.f.Close() }

type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

func (w *ctxWriter) Write(p []byte) (int, error) {
	if err := w.ctx.Err(); err != nil {
		return 0, err
	}
	return w.w.Write(p)
}
