//go:build !linux

package etcdstore

import "os"

// syncTree flushes the directory itself; other systems have no syncfs.
func syncTree(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
