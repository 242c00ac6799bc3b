// Package fsutil holds file-system helpers shared by the store, the CLI and
// the bench.
package fsutil

import (
	"io/fs"
	"os"
	"path/filepath"
)

// RemoveAll deletes a tree whose directories may have been made read-only
// (published packages are): it makes every directory writable by its
// owner first, then calls os.RemoveAll, whose error it returns.
func RemoveAll(path string) error {
	filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error { //nolint:errcheck // RemoveAll reports what matters
		if err == nil && d.IsDir() {
			os.Chmod(p, 0o700)
		}
		return nil
	})
	return os.RemoveAll(path)
}
