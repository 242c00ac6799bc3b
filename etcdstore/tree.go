package etcdstore

import (
	"io/fs"
	"os"
	"path/filepath"
)

// RemoveTree deletes a tree whose directories may have been made read-only
// (published packages are): it makes every directory writable by its owner
// first, then calls os.RemoveAll, whose error it returns.
func RemoveTree(path string) error {
	filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error { //nolint:errcheck // RemoveAll reports what matters
		if err == nil && d.IsDir() {
			os.Chmod(p, 0o700)
		}
		return nil
	})
	return os.RemoveAll(path)
}
