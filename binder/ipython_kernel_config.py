# Copied into ~/.ipython/profile_default/ by binder/postBuild: every IPython kernel loads
# the ftwidgets extension (%finetune, %ftstatus), as `%load_ext ftwidgets` would.
c = get_config()  # noqa: F821 (provided by IPython when it reads this file)
c.InteractiveShellApp.extensions.append("ftwidgets")
