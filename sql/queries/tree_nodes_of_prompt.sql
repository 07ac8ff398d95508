-- `toa tree`: one prompt's search tree nodes (every run; toa.treeview picks the run).
SELECT * FROM tree_nodes WHERE prompt_id = ? AND method = ?
